//! CLIP BPE tokenizer, as transformers' CLIPTokenizer.
