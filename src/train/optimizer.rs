//! The optimizer a run uses: fp32 AdamW or 8-bit AdamW, behind one interface.
