"""The ``kdcache`` command line, configuration, executors and the demo."""
