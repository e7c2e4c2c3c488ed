// VNC server; see STYLE.md.
