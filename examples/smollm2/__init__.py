"""``make demo``: SmolLM2-135M-Instruct fine-tuned with OTR + LoRA through ``axolotl train``
(``demo.py``); its GGUF converter (``smollm2_model.py``) is shared with the study."""
