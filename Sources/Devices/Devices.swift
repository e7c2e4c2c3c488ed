// Board devices live here; see STYLE.md.
