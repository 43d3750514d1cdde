"""The public Generator service: validates, queues, and relays Encode -> Denoise -> Decode.

It moves tensor bytes between stages and never imports torch.
"""
