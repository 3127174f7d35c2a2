"""The study's own tests (``make test-experiments``), apart from the plugin's (``make test``)."""
