"""Model code.

- ``llm``: the decoder LLM (Llama 3, Qwen 2, Gemma 2); ``lora``: LoRA adapters; ``hf``: Hugging
  Face checkpoints in and out.
- ``transformer``: the pre-LN encoder block shared by the towers below.
- ``vision``: ViT, CLIP vision and SigLIP vision towers (HF checkpoints) and image preprocessing
  that keeps the whole printout.
- ``ecg_encoders``: MERL's 1-D ResNet, ViT-1D, ST-MEM, MTAE and MLAE.
- ``projector`` and ``elm``: encoder -> projector -> the LLM's placeholder rows.
"""
