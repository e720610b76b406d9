"""The two stages and what they share, one room each:

capture/   stage one: teacher -> cache (imports models and storage)
train/     stage two: cache -> student (imports models and storage, never capture)
models/    below both: model adapters, the built-in GPT, tokenizers, devices
"""
