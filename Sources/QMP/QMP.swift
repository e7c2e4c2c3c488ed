// QMP server; see STYLE.md.
