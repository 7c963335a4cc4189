"""The Llama-family model, its loader, quantization and tokenizer."""
