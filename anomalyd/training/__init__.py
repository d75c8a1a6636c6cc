"""Making a bundle: fit the memory (and the head) from images, with the engines to run the network."""
