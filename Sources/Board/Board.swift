// Board assembly; see STYLE.md.
