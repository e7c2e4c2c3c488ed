print("schema-gen: not written yet")
