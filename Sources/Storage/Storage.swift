// Disk image formats; see STYLE.md.
