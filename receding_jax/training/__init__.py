"""The training loop: config, data, optimiser, steps and loop, checkpoints, the workdir's files and the
experiment's phases. Imports the library above it; the library imports nothing from here."""
