"""The arena: `shine arena` trains a small byte-level GPT with each optimizer and compares them.

Modules: data (corpus and batches), model (the GPT), runner (one training run, the run log),
report (progress, table, files), command (the command-line options and the whole loop).
"""
