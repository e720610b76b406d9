"""Stage one (teacher -> cache), stage two (cache -> student), losses and model adapters."""
