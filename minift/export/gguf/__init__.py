"""GGUF files for llama.cpp and Ollama: the writer, architectures, tokenizers, LoRA adapters and the converter."""
