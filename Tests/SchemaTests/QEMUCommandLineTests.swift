import Foundation
import FuzzSupport
import Testing
@testable import Schema

/// The QEMU-style command line front end: what each option becomes in the description, and
/// that everything it cannot honour is refused by name.
@Suite struct QEMUCommandLineTests {
    /// Parses without touching the file system (every probed image is raw).
    func parse(_ args: [String]) throws -> QEMUInvocation {
        try QEMUCommandLine.parse(args, workingDirectory: "/work", probeFormat: { _ in .raw })
    }

    /// The error message for `args`, or nil when they parse.
    func refusal(_ args: [String]) -> String? {
        do { _ = try parse(args); return nil } catch { return "\(error)" }
    }

    @Test func detectsQEMUStyleBySingleDashLongOptions() {
        #expect(QEMUCommandLine.looksLikeQEMU(["-M", "virt"]))
        #expect(QEMUCommandLine.looksLikeQEMU(["-nographic"]))
        #expect(QEMUCommandLine.looksLikeQEMU(["-version"]))
        #expect(QEMUCommandLine.looksLikeQEMU(["-m", "256"]))
        #expect(!QEMUCommandLine.looksLikeQEMU(["--config", "x.json", "-S"]))
        #expect(!QEMUCommandLine.looksLikeQEMU(["-S", "--config", "x.json"]))
        #expect(!QEMUCommandLine.looksLikeQEMU(["-h"]))
        #expect(!QEMUCommandLine.looksLikeQEMU([]))
    }

    @Test func theSharedGuestArgvBecomesTheDescription() throws {
        let inv = try parse(["-M", "virt", "-m", "256", "-smp", "2", "-kernel", "Image", "-initrd", "/g/initrd",
                             "-append", "console=ttyS0 quiet", "-nographic", "-nodefaults", "-serial", "file:s.log",
                             "-qmp", "unix:/tmp/q.sock,server=on,wait=off", "-no-reboot", "-pidfile", "vm.pid", "-daemonize"])
        let d = inv.description
        #expect(inv.action == .run)
        #expect(d.machine == .virt && d.memory == "256M" && d.cpus == 2)
        #expect(d.kernel == "/work/Image" && d.initrd == "/g/initrd" && d.append == "console=ttyS0 quiet")
        #expect(d.firmware == nil)
        #expect(d.serial?.json == ["backend": "file", "path": "/work/s.log", "append": false])
        #expect(d.qmp?.map(\.json) == [["backend": "unix", "path": "/tmp/q.sock"]])
        #expect(d.actions?.reboot == .shutdown && d.actions?.shutdown == .poweroff)
        #expect(inv.pidfile == "/work/vm.pid" && inv.daemonize)
    }

    @Test func memorySizesFollowQEMU() throws {
        #expect(try parse(["-M", "virt", "-m", "512"]).description.memory == "512M")
        #expect(try parse(["-M", "virt", "-m", "1G"]).description.memory == "1G")
        #expect(try parse(["-M", "virt", "-m", "size=2048M"]).description.memory == "2G")
        #expect(try parse(["-M", "virt"]).description.memory == "128M")  // QEMU's default for virt
        #expect(refusal(["-M", "virt", "-m", "lots"])?.hasPrefix("-m lots") == true)
        #expect(refusal(["-M", "virt", "-m", "64G"])?.contains("memory") == true)
        #expect(refusal(["-M", "virt", "-m", "256,maxmem=1G"])?.contains("'maxmem'") == true)
    }

    @Test func smpTopologyMustAgree() throws {
        #expect(try parse(["-M", "virt", "-smp", "4,sockets=1,cores=4,threads=1"]).description.cpus == 4)
        #expect(try parse(["-M", "virt", "-smp", "sockets=2,cores=2"]).description.cpus == 4)
        #expect(refusal(["-M", "virt", "-smp", "3,sockets=2,cores=2"])?.contains("topology") == true)
        #expect(refusal(["-M", "virt", "-smp", "2,maxcpus=4"])?.contains("hot-plug") == true)
        #expect(refusal(["-M", "virt", "-smp", "9"])?.contains("cpus") == true)
    }

    @Test func nographicDaemonizeRuleIsQEMUs() {
        #expect(refusal(["-M", "virt", "-nographic", "-daemonize"]) == "-nographic cannot be used with -daemonize (give -nodefaults, or -serial, -parallel none and -monitor/-qmp)")
        #expect(refusal(["-M", "virt", "-nographic", "-daemonize", "-nodefaults"]) == nil)
        #expect(refusal(["-M", "virt", "-nographic", "-daemonize", "-serial", "null", "-parallel", "none", "-monitor", "none"]) == nil)
    }

    @Test func serialDefaultsAndForms() throws {
        #expect(try parse(["-M", "virt", "-nographic"]).description.serial?.json == ["backend": "stdio"])
        #expect(try parse(["-M", "virt"]).description.serial?.json == ["backend": "none"])
        #expect(try parse(["-M", "virt", "-serial", "mon:stdio"]).description.serial?.json == ["backend": "stdio"])
        #expect(try parse(["-M", "virt", "-serial", "tcp:127.0.0.1:4444,server=on,wait=off"]).description.serial?.json
                == ["backend": "tcp", "host": "127.0.0.1", "port": 4444])
        #expect(try parse(["-M", "virt", "-chardev", "ringbuf,id=r,size=1024", "-serial", "chardev:r"]).description.serial?.json
                == ["backend": "ringbuf", "id": "r", "size": 1024])
        // libvirt's console: a pty chardev whose id is the label query-chardev reports.
        #expect(try parse(["-M", "virt", "-chardev", "pty,id=charserial0", "-serial", "chardev:charserial0"]).description.serial?.json
                == ["backend": "pty", "id": "charserial0"])
        #expect(try parse(["-M", "virt", "-serial", "pty"]).description.serial?.json == ["backend": "pty"])
        #expect(refusal(["-M", "virt", "-chardev", "pty,id=p,path=/tmp/link", "-serial", "chardev:p"])?.contains("path=") == true)
        #expect(refusal(["-M", "virt", "-serial", "vc"])?.hasPrefix("-serial vc: not supported") == true)
        #expect(refusal(["-M", "virt", "-serial", "unix:/tmp/s,server=on"])?.contains("wait=off") == true)
        #expect(refusal(["-M", "virt", "-serial", "null", "-serial", "null"])?.contains("one serial port") == true)
    }

    @Test func monitorsBecomeQMPListeners() throws {
        let d = try parse(["-M", "virt", "-chardev", "socket,id=mon,path=/tmp/m.sock,server=on,wait=off",
                           "-mon", "chardev=mon,id=monitor,mode=control", "-qmp", "tcp:127.0.0.1:4445,server,nowait"]).description
        #expect(d.qmp?.map(\.json) == [["backend": "tcp", "host": "127.0.0.1", "port": 4445],
                                       ["backend": "unix", "path": "/tmp/m.sock"]])
        let hmp = try parse(["-M", "virt", "-chardev", "socket,id=h,path=/tmp/h,server=on,wait=off", "-mon", "chardev=h",
                             "-monitor", "tcp:127.0.0.1:4446,server=on,wait=off"]).description
        #expect(hmp.hmp?.map(\.json) == [["backend": "tcp", "host": "127.0.0.1", "port": 4446], ["backend": "unix", "path": "/tmp/h"]])
        #expect(hmp.qmp == nil)
        #expect(try parse(["-M", "virt", "-chardev", "socket,id=mon,fd=24,server=on,wait=off", "-mon", "chardev=mon,mode=control"])
                .description.qmp?.map(\.json) == [["backend": "fd", "fd": 24]])
        #expect(refusal(["-M", "virt", "-chardev", "socket,id=s,fd=24,server=on,wait=off", "-serial", "chardev:s"])?.contains("fd=") == true)
        #expect(refusal(["-M", "virt", "-chardev", "file,id=x,path=/tmp/f"])?.contains("not used") == true)
        #expect(refusal(["-M", "virt", "-monitor", "stdio"])?.contains("no monitor multiplexing") == true)
    }

    @Test func drivesBlockdevsAndDevicesMeetInTheDescription() throws {
        let d = try parse(["-M", "virt",
                           "-drive", "if=none,id=d0,file=a.raw,format=raw,readonly=on",
                           "-device", "virtio-blk-device,drive=d0,id=disk0",
                           "-blockdev", #"{"driver":"file","filename":"/i/b.qcow2","node-name":"s1","auto-read-only":true,"discard":"unmap"}"#,
                           "-blockdev", #"{"node-name":"f1","read-only":false,"driver":"qcow2","file":"s1"}"#,
                           "-device", "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x1",
                           "-device", #"{"driver":"virtio-blk-pci","bus":"pci.1","addr":"0x0","drive":"f1","id":"virtio-disk0"}"#,
                           "-drive", "file=/i/c.img,if=virtio"]).description
        let devs = d.devices?.map(\.json) ?? []
        #expect(devs.count == 4)
        #expect(devs[0] == ["driver": "virtio-blk-device", "id": "disk0", "drive": ["file": "/work/a.raw", "format": "raw", "read-only": true]])
        #expect(devs[1] == ["driver": "pcie-root-port", "id": "pci.1", "bus": "pcie.0", "addr": "0x1", "chassis": 1])
        #expect(devs[2] == ["driver": "virtio-blk-pci", "id": "virtio-disk0", "drive": ["file": "/i/b.qcow2", "format": "qcow2", "read-only": false,
                                                                                "node-name": "f1", "file-node-name": "s1"], "bus": "pci.1", "addr": "0x0"])
        #expect(devs[3] == ["driver": "virtio-blk-pci", "id": "virtio1", "drive": ["file": "/i/c.img", "format": "raw", "read-only": false]])
    }

    @Test func libvirtsPackedRootPortsKeepTheirFunctionsAndMultifunction() throws {
        // libvirt 9's automatic root ports on riscv virt: functions of slot 1.
        let d = try parse(["-M", "virt",
                           "-device", "pcie-root-port,port=8,chassis=1,id=pci.1,bus=pcie.0,multifunction=on,addr=0x1",
                           "-device", "pcie-root-port,port=9,chassis=2,id=pci.2,bus=pcie.0,addr=0x1.0x1",
                           "-device", "virtio-rng-pci,id=rng0,bus=pcie.0,addr=0x2,multifunction=off"]).description
        let devs = d.devices?.map(\.json) ?? []
        #expect(devs.count == 3)
        #expect(devs[0] == ["driver": "pcie-root-port", "id": "pci.1", "bus": "pcie.0", "addr": "0x1", "multifunction": true, "chassis": 1])
        #expect(devs[1] == ["driver": "pcie-root-port", "id": "pci.2", "bus": "pcie.0", "addr": "0x1.0x1", "chassis": 2])
        #expect(devs[2] == ["driver": "virtio-rng-pci", "id": "rng0", "bus": "pcie.0", "addr": "0x2", "multifunction": false])
        #expect(refusal(["-M", "virt", "-device", "pcie-root-port,id=p,multifunction=maybe"])?.contains("multifunction") == true)
        #expect(refusal(["-M", "virt", "-device", "virtio-rng-device,multifunction=on"])?.contains("multifunction") == true)
    }

    @Test func unsupportedThingsAreRefusedByName() {
        #expect(refusal(["-M", "virt", "-nic", "user"])?.contains("needs model=virtio-net-pci") == true)
        #expect(refusal(["-M", "virt", "-net", "nic"])?.hasPrefix("-net: not supported") == true)
        #expect(refusal(["-M", "virt", "-frobnicate"]) == "-frobnicate: invalid option")
        #expect(refusal(["-M", "virt", "-usbdevice", "tablet"]) == "-usbdevice: not supported by machine-server")
        #expect(refusal(["-M", "virt", "-device", "e1000,id=n"])?.hasPrefix("-device e1000: not supported") == true)
        #expect(refusal(["-M", "virt", "-device", "virtio-blk-pci,drive=nowhere"])?.contains("drive=nowhere") == true)
        #expect(refusal(["-M", "virt", "-device", "virtio-rng-pci,bogus=1"])?.contains("'bogus'") == true)
        #expect(refusal(["-M", "virt", "-cpu", "sifive-u54"])?.contains("rv64") == true)
        #expect(refusal(["-M", "virt", "-accel", "kvm"])?.contains("tcg") == true)
        #expect(refusal(["-M", "virt", "-sandbox", "on"])?.contains("seccomp") == true)
        #expect(refusal(["-M", "virt", "-object", "throttle-group,id=t"])?.contains("-object throttle-group") == true)
        #expect(refusal(["-M", "virt", "-object", "secret,id=s,data=x,file=/f"])?.contains("exactly one of") == true)
        #expect(refusal(["-M", "virt", "-dtb", "x.dtb"])?.contains("device tree") == true)
        #expect(refusal(["-M", "virt", "-uuid", "nope"])?.contains("UUID") == true)
        #expect(refusal(["-M", "virt", "-drive", "file=x,if=ide"])?.contains("if=ide") == true)
        #expect(refusal(["-M", "virt", "-m"]) == "-m: requires an argument")
        #expect(refusal(["disk.img"])?.contains("-hda") == true)
        #expect(refusal(["-m", "256"])?.contains("No machine specified") == true)
        #expect(refusal(["-machine", "none", "-kernel", "k"])?.contains("-machine none") == true)
    }

    @Test func netdevUserAndItsNICBecomeTheDescription() throws {
        let inv = try parse(["-M", "virt", "-netdev", "user,id=n0,net=10.1.0.0/24,dhcpstart=10.1.0.20,restrict=off,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp::5353-:53,guestfwd=tcp:10.1.0.9:4321-cmd:cat",
                             "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc,id=nic0,bus=pcie.0,addr=0x3"])
        let d = inv.description
        #expect(d.netdevs?.map(\.json) == [["id": "n0", "type": "user", "net": "10.1.0.0/24", "dhcpstart": "10.1.0.20", "restrict": false,
            "hostfwd": [["str": "tcp:127.0.0.1:8080-:80"], ["str": "udp::5353-:53"]], "guestfwd": [["str": "tcp:10.1.0.9:4321-cmd:cat"]]]])
        #expect(d.devices?.map(\.json) == [["driver": "virtio-net-pci", "id": "nic0", "netdev": "n0", "mac": "52:54:00:aa:bb:cc",
                                             "bus": "pcie.0", "addr": "0x3"]])
        #expect(inv.warnings.isEmpty)
        // The mmio NIC, QEMU's alias virtio-net (= virtio-net-pci), and the JSON forms libvirt writes.
        let mmio = try parse(["-M", "virt", "-netdev", "user,id=u", "-device", "virtio-net-device,netdev=u"]).description
        #expect(mmio.devices?.map(\.json) == [["driver": "virtio-net-device", "netdev": "u"]])
        #expect(try parse(["-M", "virt", "-netdev", "user,id=u", "-device", "virtio-net,netdev=u"]).description.devices?.first?.driver == .virtioNetPci)
        let json = try parse(["-M", "virt", "-netdev", #"{"type":"user","id":"hostnet0","hostfwd":[{"str":"tcp::2222-:22"}]}"#,
                              "-device", #"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:01:02:03"}"#]).description
        #expect(json.netdevs?.first?.json == ["id": "hostnet0", "type": "user", "hostfwd": [["str": "tcp::2222-:22"]]])
        // An unused netdev is kept, with QEMU's warning.
        #expect(try parse(["-M", "virt", "-netdev", "user,id=lonely"]).warnings == ["warning: netdev lonely has no peer"])
    }

    @Test func nicIsANetdevPlusItsNIC() throws {
        let d = try parse(["-M", "virt", "-nic", "user,model=virtio-net-pci,mac=52:54:00:00:00:09,hostfwd=tcp::2222-:22,hostfwd=tcp::8080-:80",
                           "-nic", "model=virtio-net-device", "-nic", "none"]).description
        #expect(d.netdevs?.map(\.json) == [["id": "__org.qemu.nic0", "type": "user", "hostfwd": [["str": "tcp::2222-:22"], ["str": "tcp::8080-:80"]]],
                                             ["id": "__org.qemu.nic1", "type": "user"]])
        #expect(d.devices?.map(\.json) == [["driver": "virtio-net-pci", "netdev": "__org.qemu.nic0", "mac": "52:54:00:00:00:09"],
                                            ["driver": "virtio-net-device", "netdev": "__org.qemu.nic1"]])
        let named = try parse(["-M", "virt", "-nic", "stream,id=l0,model=virtio-net-device,addr.type=unix,addr.path=/s"]).description
        #expect(named.netdevs?.first?.id == "l0" && named.devices?.first?.json == ["driver": "virtio-net-device", "netdev": "l0"])
        #expect(refusal(["-M", "virt", "-nic", "tap,model=virtio-net-pci"]) == "-nic tap: not supported (supported: user, stream)")
        #expect(refusal(["-M", "virt", "-nic", "user,model=e1000"])?.hasPrefix("-device e1000: not supported") == true)
        #expect(refusal(["-M", "virt", "-nic", "user,model=virtio-net-pci,smb=/x"])?.contains("-nic user,id=__org.qemu.nic0: parameter 'smb'") == true)
    }

    @Test func netdevStreamConvertsTypes() throws {
        let server = try parse(["-M", "virt", "-netdev", "stream,id=s0,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port=5555",
                                "-device", "virtio-net-device,netdev=s0"]).description
        #expect(server.netdevs?.first?.json == ["id": "s0", "type": "stream", "addr": ["type": "inet", "host": "127.0.0.1", "port": "5555"], "server": true])
        let client = try parse(["-M", "virt", "-netdev", "stream,id=s1,server=off,addr.type=unix,addr.path=net.sock,reconnect=2"]).description
        #expect(client.netdevs?.first?.json == ["id": "s1", "type": "stream", "addr": ["type": "unix", "path": "/work/net.sock"], "server": false, "reconnect": 2])
    }

    @Test func badNetdevsAreRefusedNamingTheOption() throws {
        #expect(refusal(["-M", "virt", "-netdev", "tap,id=t0"]) == "-netdev tap: not supported (supported: user, stream)")
        #expect(refusal(["-M", "virt", "-netdev", "user"])?.hasPrefix("-netdev user:") == true)  // no id
        #expect(refusal(["-M", "virt", "-netdev", "user,id=n,restrict=maybe"])?.contains("'restrict' expects 'on' or 'off'") == true)
        #expect(refusal(["-M", "virt", "-netdev", "user,id=n,net=10.0.0.0/8,net=10.1.0.0/16"])?.contains("'net' is given more than once") == true)
        #expect(refusal(["-M", "virt", "-netdev", "user,id=n,smb=/srv"])?.contains("'smb' is not supported") == true)
        #expect(refusal(["-M", "virt", "-netdev", "user,id=n", "-netdev", "user,id=n"])?.contains("Duplicate ID 'n'") == true)
        #expect(refusal(["-M", "virt", "-netdev", "stream,id=s,addr.type=inet,addr.host=h,addr.port=99999"])?.contains("addr.port=99999") == true)
        #expect(refusal(["-M", "virt", "-netdev", "stream,id=s,addr.type=inet,addr.port=1"])?.hasPrefix("-netdev stream,id=s:") == true)  // no host
        #expect(refusal(["-M", "virt", "-netdev", "stream,id=s,addr.type=fd,addr.str=3"])?.contains("addr.type=fd") == true)
        #expect(refusal(["-M", "virt", "-netdev", "stream,id=s,server=on,addr.type=unix,addr.path=/p,reconnect=4000"])?.contains("reconnect") == true)
        #expect(refusal(["-M", "virt", "-netdev", "stream,id=s,hostfwd=x,addr.type=unix,addr.path=/p"])?.contains("'hostfwd' is not supported") == true)
        #expect(refusal(["-M", "virt", "-netdev", "{\"type\":\"user\""])?.contains("not valid JSON") == true)
        #expect(refusal(["-M", "virt", "-device", "virtio-net-pci,netdev=nowhere"]) == "-device virtio-net-pci: netdev=nowhere names no -netdev")
        #expect(refusal(["-M", "virt", "-netdev", "user,id=n", "-device", "virtio-net-pci,netdev=n", "-device", "virtio-net-device,netdev=n"])?
            .contains("already in use") == true)
        #expect(refusal(["-M", "virt", "-netdev", "user,id=n", "-device", "virtio-net-pci,netdev=n,mq=on"])?.contains("'mq'") == true)
        #expect(try parse(["-M", "virt", "-netdev", "user,id=n", "-device", "virtio-net-pci,netdev=n,romfile="]).description.devices?.count == 1)
        #expect(refusal(["-M", "virt", "-netdev", "user,id=n", "-device", "virtio-net-pci,netdev=n,romfile=efi-virtio.rom"])?.contains("option ROMs") == true)
        #expect(refusal(["-M", "none", "-netdev", "user,id=n"])?.contains("-machine none") == true)
    }

    @Test func gdbAndIncomingAddresses() throws {
        // QEMU's -s is -gdb tcp::1234, which listens on every interface.
        #expect(try parse(["-M", "virt", "-s"]).description.gdb == "tcp:0.0.0.0:1234")
        #expect(try parse(["-M", "virt", "-gdb", "tcp::4321"]).description.gdb == "tcp:0.0.0.0:4321")
        #expect(try parse(["-M", "virt", "-gdb", "tcp:127.0.0.1:1234"]).description.gdb == "tcp:127.0.0.1:1234")
        #expect(try parse(["-M", "virt", "-s", "-gdb", "none"]).description.gdb == nil)
        #expect(refusal(["-M", "virt", "-gdb", "unix:/tmp/g"])?.contains("only tcp:[HOST]:PORT") == true)
        #expect(refusal(["-M", "virt", "-gdb", "tcp::70000"])?.hasPrefix("-gdb tcp::70000: expected [HOST]:PORT") == true)

        #expect(try parse(["-M", "virt", "-incoming", "tcp:127.0.0.1:4444"]).incoming == "tcp:127.0.0.1:4444")
        #expect(try parse(["-M", "virt", "-incoming", "tcp::4444"]).incoming == "tcp:0.0.0.0:4444")
        #expect(try parse(["-M", "virt", "-incoming", "tcp:[::1]:4444"]).incoming == "tcp:[::1]:4444")
        #expect(try parse(["-M", "virt", "-incoming", "unix:mig.sock"]).incoming == "unix:/work/mig.sock")
        #expect(try parse(["-M", "virt", "-incoming", "defer"]).incoming == "defer")
        // libvirt's restore passes the save file as an inherited descriptor.
        #expect(try parse(["-M", "virt", "-incoming", "fd:22"]).incoming == "fd:22")
        #expect(refusal(["-M", "virt", "-incoming", "fd:migrate"])?.contains("fd:N") == true)
        // libvirt's snapshot-revert restarts the machine with -loadvm.
        #expect(try parse(["-M", "virt", "-loadvm", "snap1"]).loadvm == "snap1")
        #expect(try parse(["-M", "virt"]).loadvm == nil)
        // What libvirt puts on the command line for a virtio disk behind a root port.
        let pcie = try parse(["-M", "virt", "-device", "pcie-root-port,port=8,chassis=1,id=pci.1,bus=pcie.0,addr=0x1",
                              "-blockdev", #"{"driver":"file","filename":"/g/d.qcow2","node-name":"s","auto-read-only":true,"discard":"unmap"}"#,
                              "-blockdev", #"{"node-name":"f","read-only":false,"driver":"qcow2","file":"s"}"#,
                              "-device", "virtio-blk-pci-non-transitional,bus=pci.1,addr=0x0,drive=f,id=virtio-disk1,disable-legacy=on"]).description
        #expect(pcie.devices?.last?.json["driver"] == "virtio-blk-pci")
        #expect(refusal(["-M", "virt", "-blockdev", #"{"driver":"file","filename":"/g/d.qcow2","node-name":"s"}"#,
                         "-blockdev", #"{"node-name":"f","driver":"qcow2","file":"s"}"#,
                         "-device", "virtio-blk-pci,drive=f,disable-legacy=off"])?.contains("disable-legacy=off") == true)
        #expect(try parse(["-M", "virt", "-incoming", "file:s.state"]).incoming == "file:/work/s.state")
        #expect(refusal(["-M", "virt", "-incoming", "rdma:1.2.3.4:5"])?.contains("not tcp:[HOST]:PORT") == true)
        #expect(refusal(["-M", "virt", "-incoming", "tcp:host"])?.contains("[HOST]:PORT") == true)
    }

    @Test func libvirtsProbeCommandLineIsTheEmptyMachine() throws {
        let inv = try parse(["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=tcg",
                             "-qmp", "unix:/run/p.monitor,server=on,wait=off", "-pidfile", "/run/p.pid", "-daemonize"])
        #expect(inv.description.machine == .none)
        #expect(inv.description.start == .paused)
        #expect(inv.description.serial?.json == ["backend": "none"])
        #expect(inv.daemonize && inv.pidfile == "/run/p.pid")
    }

    @Test func libvirtsDomainCommandLineIsAccepted() throws {
        let inv = try parse(["-name", "guest=rv,debug-threads=on", "-S",
            "-object", #"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/l/master-key.aes"}"#,
            "-machine", "virt,usb=off,dump-guest-core=off,memory-backend=riscv_virt_board.ram", "-accel", "tcg", "-m", "256",
            "-object", #"{"qom-type":"memory-backend-ram","id":"riscv_virt_board.ram","size":268435456}"#,
            "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1", "-uuid", "4331743d-b28e-43fd-bc28-12da90ecd34a",
            "-no-user-config", "-nodefaults", "-chardev", "socket,id=charmonitor,fd=24,server=on,wait=off",
            "-mon", "chardev=charmonitor,id=monitor,mode=control", "-rtc", "base=utc", "-no-shutdown", "-boot", "strict=on",
            "-kernel", "/g/Image", "-append", "console=ttyS0",
            "-blockdev", #"{"driver":"file","filename":"/g/d.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
            "-blockdev", #"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":null}"#,
            "-device", "virtio-blk-device,drive=libvirt-1-format,id=virtio-disk0,bootindex=1",
            "-add-fd", "set=0,fd=27,opaque=serial0-log", "-chardev", "file,id=charserial0,path=/dev/fdset/0,append=on",
            "-serial", "chardev:charserial0", "-audiodev", #"{"id":"audio1","driver":"none"}"#,
            "-vnc", "127.0.0.1:0,audiodev=audio1", "-device", "virtio-gpu-device,id=video0,max_outputs=1",
            "-msg", "timestamp=on"])
        let d = inv.description
        #expect(d.qmp?.map(\.json) == [["backend": "fd", "fd": 24]])
        #expect(d.serial?.json == ["backend": "file", "id": "charserial0", "path": "/proc/self/fd/27", "append": true])
        #expect(d.devices?.first?.json == ["driver": "virtio-blk-device", "id": "virtio-disk0",
            "drive": ["file": "/g/d.qcow2", "format": "qcow2", "read-only": false, "node-name": "libvirt-1-format",
                      "file-node-name": "libvirt-1-storage"]])
        #expect(d.actions?.shutdown == .pause && d.start == .paused && inv.messageTimestamps)
        #expect(refusal(["-M", "virt", "-chardev", "file,id=c,path=/dev/fdset/3", "-serial", "chardev:c"])?.contains("no -add-fd set") == true)
    }

    @Test func versionHelpAndPrintDescription() throws {
        #expect(try parse(["-version"]).action == .printVersion)
        #expect(try parse(["-help"]).action == .printHelp)
        #expect(try parse(["-M", "virt", "--print-description"]).action == .printDescription)
        #expect(QEMUCommandLine.versionText.hasPrefix("QEMU emulator version 7.2.0"))
    }

    @Test func keyValueSyntax() throws {
        let kv = try QEMUKeyValue(parsing: "virt,a=1,,2,b", impliedKey: "type")
        #expect(kv.keys == ["type", "a", "b"])
        #expect(kv["a"] == "1,2" && kv["b"] == "on")
        #expect(throws: QEMUCommandLineError.self) { try QEMUKeyValue(parsing: "a=1,a=2") }
        #expect(throws: QEMUCommandLineError.self) { try QEMUKeyValue(parsing: "=x") }
        // Only the keys QEMU treats as lists may repeat.
        let fwd = try QEMUKeyValue(parsing: "user,id=n,hostfwd=a,hostfwd=b", impliedKey: "type", repeatable: ["hostfwd"])
        #expect(fwd.values("hostfwd") == ["a", "b"] && fwd["hostfwd"] == "a")
        #expect(throws: QEMUCommandLineError.self) { try QEMUKeyValue(parsing: "id=a,id=b", repeatable: ["hostfwd"]) }
        let json = try QEMUKeyValue(parsing: #"{"driver":"qcow2","file":{"driver":"file","filename":"/x"},"read-only":true,"n":3}"#, acceptsJSON: true)
        #expect(json.keys == ["driver", "file.driver", "file.filename", "read-only", "n"])
        #expect(json["read-only"] == "on" && json["n"] == "3")
    }

    @Test func everyParsedCommandLineIsAValidDescription() throws {
        for seed in Fuzz.corpus("qemu-argv") {
            let args = seed.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            let inv = try parse(args)
            // Round trip: the printed description parses back to the same value.
            let again = try MachineDescription.parse(jsonText: inv.description.json.serialized())
            #expect(again == inv.description)
        }
    }

    /// Outside input: every mutated argv parses to a valid description or is refused with a
    /// message; none crashes.
    @Test func fuzzedCommandLinesAreParsedOrRefusedNeverCrash() throws {
        let seeds = Fuzz.corpus("qemu-argv")
        try #require(seeds.count >= 4, "the qemu-argv seed corpus is missing")
        let tokens = ["\0", "-", "--", ",", ",,", "=", "{", "}", ":", "-M", "virt", "-m", "-device", "-drive", "-blockdev",
                      "-chardev", "-serial", "-qmp", "-mon", "-smp", "server=on", "wait=off", "id=", "drive=", "chardev:",
                      "unix:", "tcp:", "file:", "18446744073709551616", "0x", "-1", "none", "{\"driver\":",
                      "-netdev", "user,id=", "stream,id=", "hostfwd=", "guestfwd=", "addr.type=", "addr.port=", "netdev=",
                      "-gdb", "-s", "-incoming", "{\"type\":", "-nic", "model=virtio-net-pci"]
        var unnamed: [String] = []
        let report = Fuzz.run(target: "qemu-argv", seeds: seeds, seconds: Fuzz.budget(ci: 2),
                              dictionary: tokens.map { Array($0.utf8) }) { input in
            let args = input.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
            do {
                let inv = try parse(args)
                if inv.action == .run {
                    _ = try MachineDescription.parse(jsonText: inv.description.json.serialized())
                }
            } catch {
                if "\(error)".isEmpty && unnamed.count < 5 { unnamed.append(args.joined(separator: " ")) }
                throw error
            }
        }
        print(report)
        #expect(report.problems.isEmpty, "\(report.problems)")
        #expect(unnamed.isEmpty, "refusals without a message: \(unnamed)")
        #expect(report.executions > seeds.count)
    }
}
