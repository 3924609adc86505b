"""The Llama / Mistral model: config, transformer, attention masks, Hugging Face checkpoint I/O."""
