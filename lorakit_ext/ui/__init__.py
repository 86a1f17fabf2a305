"""Front ends shared by every host: the gradio tabs, the job manager and path rules the HTTP API also uses.

Nothing here imports ``modules.*``: what differs between the WebUI and the standalone app sits behind ``Host``.
"""
