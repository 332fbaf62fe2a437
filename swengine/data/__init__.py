"""Training data: reading files, chat/instruction formats with loss masks, packing, batching."""
