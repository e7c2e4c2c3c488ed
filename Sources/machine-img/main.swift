print("machine-img: not written yet")
