"""What both stages share: model adapters (one class per kind of model), kdcache's built-in GPT,
tokenizers and their fingerprints, devices and CPU threads. Imports kdcache.storage only."""
