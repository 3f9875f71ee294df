//! Blockwise 8-bit AdamW (bitsandbytes-style dynamic quantisation of both moments).
