"""Tokenizers: ECG-Byte symbols and BPE (ecgbyte), LLM text tokenizer and chat template (text)."""
