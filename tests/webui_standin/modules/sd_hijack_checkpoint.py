"""Stand-in of ``modules.sd_hijack_checkpoint``: gradient checkpointing hooks the WebUI adds only while training."""

active = False


def add():
    global active
    active = True


def remove():
    global active
    active = False
