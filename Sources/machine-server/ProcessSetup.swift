import Foundation

/// QEMU's process-level options: `-daemonize`, `-pidfile`, `-D`. Used on the main thread
/// during launch only.
enum ProcessSetup {
    /// The child's side of `-daemonize`: tells the waiting parent the machine is up.
    struct Daemon {
        let readyFD: Int32

        /// Tells the parent to exit 0, and detaches standard input and output (and standard
        /// error unless it goes to a -D log) from the terminal, as QEMU does.
        func ready(keepStandardError: Bool) {
            var byte: UInt8 = 1
            _ = write(readyFD, &byte, 1)
            close(readyFD)
            let null = open("/dev/null", O_RDWR | O_CLOEXEC)
            if null >= 0 {
                dup2(null, 0)
                dup2(null, 1)
                if !keepStandardError { dup2(null, 2) }
                close(null)
            }
        }
    }

    /// Forks. The parent waits until the child calls `ready` (then exits 0) or ends without
    /// calling it (then exits 1: the child has printed why on the shared standard error).
    /// The child starts a new session and returns. Must be called before any thread starts.
    static func daemonize() throws -> Daemon {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw LaunchError("-daemonize: pipe: \(String(cString: strerror(errno)))") }
        let pid = fork()
        if pid < 0 { throw LaunchError("-daemonize: fork: \(String(cString: strerror(errno)))") }
        if pid > 0 {
            close(fds[1])
            var byte: UInt8 = 0
            var n: Int
            repeat { n = read(fds[0], &byte, 1) } while n < 0 && errno == EINTR
            exit(n == 1 ? 0 : 1)
        }
        close(fds[0])
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        setsid()
        return Daemon(readyFD: fds[1])
    }

    /// `-pidfile`: the server's pid, written when the machine is about to start and removed at
    /// exit. A pid file that another live process holds (a lock on it) is refused, as QEMU does.
    final class PidFile {
        let path: String
        private let fd: Int32

        init(path: String) throws {
            self.path = path
            fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw LaunchError("-pidfile: cannot open '\(path)': \(String(cString: strerror(errno)))") }
            guard lockf(fd, F_TLOCK, 0) == 0 else {
                close(fd)
                throw LaunchError("-pidfile: '\(path)' is locked by another running process")
            }
            let text = Array("\(getpid())\n".utf8)
            guard ftruncate(fd, 0) == 0, text.withUnsafeBytes({ pwrite(fd, $0.baseAddress, $0.count, 0) }) == text.count else {
                close(fd)
                throw LaunchError("-pidfile: cannot write '\(path)': \(String(cString: strerror(errno)))")
            }
        }

        /// Removes the file (at exit).
        func remove() {
            unlink(path)
            close(fd)
        }
    }

    /// memory-backend-file's `mem-path`: a file (created 0600 if missing, extended to `size`),
    /// or a directory in which an unlinked temporary file is made. Returns the open descriptor.
    static func openMemoryBackend(path: String, size: UInt64) throws -> Int32 {
        var st = stat()
        let fd: Int32
        if stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR {
            var template = Array((path as NSString).appendingPathComponent("machine-server-ram.XXXXXX").utf8CString)
            fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
            if fd >= 0 { template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) } }
        } else {
            fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        }
        guard fd >= 0 else {
            throw LaunchError("memory-backend: cannot open '\(path)': \(String(cString: strerror(errno)))")
        }
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw LaunchError("memory-backend: '\(path)' is not a regular file or a directory")
        }
        if UInt64(max(0, st.st_size)) < size, ftruncate(fd, off_t(size)) != 0 {
            let e = errno
            close(fd)
            throw LaunchError("memory-backend: cannot extend '\(path)' to \(size) bytes: \(String(cString: strerror(e)))")
        }
        return fd
    }

    /// `-D FILE`: standard error (every diagnostic the server prints) goes to FILE (appended).
    static func redirectStandardError(to path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw LaunchError("-D: cannot open '\(path)': \(String(cString: strerror(errno)))") }
        dup2(fd, 2)
        close(fd)
    }
}
