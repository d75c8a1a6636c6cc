// A PLC program written against the register map alone (modbus_registers.csv from `anomalyd plc-layout`),
// with jsmodbus: nothing here shares code with anomalyd. Runs the README's interlock for N parts and prints
// one JSON line per answer: what came over the wire, decoded by the map.
// usage: node modbus_plc.js HOST PORT MAP.csv PARTS FIRST_PART_ID
'use strict'
const fs = require('fs')
const net = require('net')
const Modbus = require('jsmodbus')

const [host, port, mapFile, parts, firstPartId] = process.argv.slice(2)

function parseCsv (text) {
  const lines = text.trim().split('\n')
  const split = (line) => {
    const out = []; let cur = ''; let quoted = false
    for (const ch of line) {
      if (ch === '"') quoted = !quoted
      else if (ch === ',' && !quoted) { out.push(cur); cur = '' } else cur += ch
    }
    out.push(cur)
    return out
  }
  const head = split(lines[0])
  return lines.slice(1).map((l) => Object.fromEntries(split(l).map((v, i) => [head[i], v])))
}

const rows = parseCsv(fs.readFileSync(mapFile, 'utf8'))
const field = (block, name) => {
  const r = rows.find((x) => x.block === block && x.name === name)
  if (!r) throw new Error(`no ${block}.${name} in the map`)
  return r
}
const statusRows = rows.filter((r) => r.block === 'status')
const first = Math.min(...statusRows.map((r) => +r.register))
const count = Math.max(...statusRows.map((r) => +r.register + +r.registers)) - first

function value (regs, r) {
  const at = +r.register - first
  if (r.type === 'BOOL') return (regs[at] & parseInt(r.mask.slice(3), 16)) !== 0
  if (r.registers === '1') return regs[at]
  const [a, b] = [regs[at], regs[at + 1]]
  const [hi, lo] = r.word_order === 'high word first' ? [a, b] : [b, a]
  const buf = Buffer.alloc(4); buf.writeUInt16BE(hi, 0); buf.writeUInt16BE(lo, 2)
  return r.type === 'REAL' ? buf.readFloatBE(0) : buf.readUInt32BE(0)
}
const words32 = (r, v) => {
  const hi = (v >>> 16) & 0xffff; const lo = v & 0xffff
  return r.word_order === 'high word first' ? [hi, lo] : [lo, hi]
}

const socket = new net.Socket()
const client = new Modbus.client.TCP(socket, 1, 5000)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function status () {
  const reply = await client.readHoldingRegisters(first, count) // ONE read: one answer
  const regs = reply.response.body.values
  return Object.fromEntries(statusRows.map((r) => [r.name, value(regs, r)]))
}

async function until (predicate, ms) {
  const end = Date.now() + ms
  for (;;) {
    const s = await status()
    if (predicate(s)) return s
    if (Date.now() > end) throw new Error('timeout')
    await sleep(5)
  }
}

async function bits (names) {
  // The command's BOOLs share one register (the map says which bit of which register).
  const rs = names.map((n) => field('command', n))
  const reg = +field('command', 'trigger').register
  let word = 0
  for (const r of rs) { if (+r.register !== reg) throw new Error('bits in two registers'); word |= parseInt(r.mask.slice(3), 16) }
  await client.writeMultipleRegisters(reg, [word])
}

async function main () {
  const partField = field('command', 'part_id')
  await bits(['enable'])
  for (let i = 0; i < +parts; i++) {
    const partId = +firstPartId + i
    const before = await until((s) => s.ready && s.trigger_ready && !s.trigger_ack, 30000)
    await client.writeMultipleRegisters(+partField.register, words32(partField, partId))
    await bits(['enable', 'trigger'])
    const s = await until((x) => x.result_valid && x.result_toggle !== before.result_toggle, 10000)
    console.log(JSON.stringify({ sent_part_id: partId, ...s }))
    await bits(['enable', 'result_ack'])
    await until((x) => !x.result_valid, 5000)
    await bits(['enable'])
  }
}

socket.on('connect', () => main().then(() => { socket.end(); process.exit(0) }, (e) => { console.error(e); process.exit(1) }))
socket.on('error', (e) => { console.error(e); process.exit(1) })
socket.connect({ host, port: +port })
