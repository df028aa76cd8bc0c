"""Model code: the decoder LLM (llm), LoRA adapters (lora) and Hugging Face checkpoints (hf)."""
