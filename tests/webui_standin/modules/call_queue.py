"""Stand-in of ``modules.call_queue``: the lock every generation holds (a FIFOLock in the WebUI)."""

import threading

queue_lock = threading.Lock()
