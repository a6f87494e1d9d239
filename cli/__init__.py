"""The commands (edit, build-dataset, train): installed as entry points and run as `python -m comfyui_ip2p.cli.<name>`.

They import anything below them; nothing in the pack imports them.
"""
