//! LoRA adapters on linear layers: attach, train, save and load with kohya key names, merge.
