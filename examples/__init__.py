"""The runnable examples (``make demo``, ``make demo-tiny``): packages so that their scripts
run as modules from the repository root (``python -m examples.smollm2.demo``) and the
OTR-vs-SFT study imports the demo's model converter instead of a copy of it."""
