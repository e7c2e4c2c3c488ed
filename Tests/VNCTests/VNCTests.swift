import Testing
@testable import VNC
