"""What every stage runs on: its device, its model thread, the model folder, tensors on the wire,
its Info reply and metrics."""
