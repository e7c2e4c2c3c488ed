// Schema runtime; see STYLE.md.
