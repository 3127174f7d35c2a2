"""When does OTR beat SFT? The study behind the README's "When does OTR help?" and the
map the plugin ships (README.md beside this file; ``python -m experiments.otr_vs_sft.run``)."""
