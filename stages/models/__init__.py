"""Built-in student models (a small readable GPT) trained by kdcache from a teacher cache."""
