import Testing
@testable import QMP
