print("machine-server")
