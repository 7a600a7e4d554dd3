#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Check pvdma's hypercall transport under TCG with a real guest CPU.

qtest runs no guest instructions, so this boots QEMU with -accel tcg and a
64 KiB -bios image assembled here from machine-code bytes (no assembler
needed). The firmware, from the reset vector:

  real mode, CPL 0: writes request blocks to RAM and runs them with VMCALL
  and VMMCALL (EAX = HYPERCALL_NR, EBX = block), storing EAX after each;
  then VMCALL and VMMCALL with another EAX, which must raise #UD (a real
  mode #UD handler counts them and skips the instruction);
  then either 32-bit protected mode at CPL 3 (a far return to a DPL 3 code
  segment), or 64-bit mode (one identity-mapped 2 MiB page) with a QUERY
  at CPL 0 and then CPL 3 (iretq): at CPL 3, VMCALL and VMMCALL with
  HYPERCALL_NR must return -1 (all 64 bits in 64-bit mode), leave RBX
  alone and run nothing;

writes a marker and spins. The script then reads the results with QMP
pmemsave and checks them against query-pvdma. A third run, with
hypercall=off and only the real mode part, checks that every call raises
#UD and FEATURES.HYPERCALL is clear.

usage: pvdma-hypercall-check.py QEMU_BINARY [TIMEOUT_SECONDS]
"""

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "framework"))
from pvdma_qemu import QMP, QemuError  # noqa: E402

NR = 0x50444D41
NOT_NR = 0x12345
QUERY, ATTACH = 1, 2
S_OK, S_NODEV, S_STATE = 0, 2, 11
EDU_A, EDU_B = 0x28, 0x30          # 00:05.0, 00:06.0
NO_RID = 0x0100                    # bus 1: nothing there

# guest RAM layout
BLK_QUERY, BLK_ATTACH, BLK_NODEV, BLK_USER = 0x1000, 0x1100, 0x1200, 0x1300
BLK_64 = 0x1400
OUT = 0x2000                       # results, one dword each
UD_COUNT = 0x2030
REAL_DONE, USER_DONE = 0x2024, 0x2020
DUMP_BASE, DUMP_LEN = 0x1000, 0x1100
BIOS_BASE = 0xF0000                # where a 64 KiB -bios image shows


class Fail(Exception):
    pass


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def firmware(mode):
    """The -bios image. mode "real": halt after the real mode part; "pm32":
    then CPL 3 in 32-bit protected mode; "long64": then CPL 0 and CPL 3 in
    64-bit mode (identity-mapped 2 MiB page)."""
    ring3 = mode != "real"
    long64 = mode == "long64"
    img = bytearray(64 * 1024)
    c = bytearray()

    def mov_d16(addr, val):        # mov dword [addr16], imm32 (DS = 0)
        c.extend(b"\x66\xc7\x06" + u16(addr) + u32(val))

    def call16(insn, eax, ebx, out):
        c.extend(b"\x66\xb8" + u32(eax))         # mov eax, imm32
        c.extend(b"\x66\xbb" + u32(ebx))         # mov ebx, imm32
        c.extend(insn)
        c.extend(b"\x66\xa3" + u16(out))         # mov [out], eax

    vmcall, vmmcall = b"\x0f\x01\xc1", b"\x0f\x01\xd9"

    # real mode, CS = 0xf000
    c.extend(b"\xfa\x31\xc0\x8e\xd8\x8e\xd0\xbc\x00\x70")  # cli; ds=ss=0; sp
    ud_fix = len(c) + 4
    c.extend(b"\xc7\x06\x18\x00" + u16(0))                  # IVT[6].ip
    c.extend(b"\xc7\x06\x1a\x00" + u16(0xF000))             # IVT[6].cs
    for blk, op, rid in ((BLK_QUERY, QUERY, EDU_A),
                         (BLK_ATTACH, ATTACH, EDU_A),
                         (BLK_NODEV, QUERY, NO_RID),
                         (BLK_USER, ATTACH, EDU_B),
                         (BLK_64, QUERY, EDU_A)):
        mov_d16(blk, op)                   # op, flags 0
        mov_d16(blk + 4, 0xDEADBEEF)       # status: must be written back
        mov_d16(blk + 8, rid)
    call16(vmcall, NR, BLK_QUERY, OUT + 0x0)
    call16(vmmcall, NR, BLK_ATTACH, OUT + 0x4)
    call16(vmcall, NR, BLK_ATTACH, OUT + 0x8)
    call16(vmmcall, NR, BLK_NODEV, OUT + 0xC)
    call16(vmcall, NOT_NR, BLK_QUERY, OUT + 0x10)
    call16(vmmcall, NOT_NR, BLK_QUERY, OUT + 0x28)
    mov_d16(REAL_DONE, 0x1111)

    if ring3:
        gdt_fix = len(c) + 5
        c.extend(b"\x66\x2e\x0f\x01\x16" + u16(0))     # lgdt cs:[gdtr]
        c.extend(b"\x0f\x20\xc0\x0c\x01\x0f\x22\xc0")  # cr0.PE = 1
        pm_fix = len(c) + 2
        c.extend(b"\x66\xea" + u32(0) + u16(0x08))      # jmp 0x08:pm32
        pm32 = len(c)
        c.extend(b"\xb8\x10\x00\x00\x00\x8e\xd8\x8e\xc0\x8e\xd0")
        c.extend(b"\xbc\x00\x70\x00\x00")               # esp = 0x7000
        if not long64:
            c.extend(b"\x6a\x23\x68" + u32(0x6000) + b"\x6a\x1b")
            r3_fix = len(c) + 1
            c.extend(b"\x68" + u32(0) + b"\xcb")        # push eip3; retf
            ring3_at = len(c)
            c.extend(b"\xb8\x23\x00\x00\x00\x8e\xd8")   # ds = 0x23
            for insn, out in ((vmcall, OUT + 0x40), (vmmcall, OUT + 0x50)):
                c.extend(b"\xb8" + u32(NR) + b"\xbb" + u32(BLK_USER) + insn)
                c.extend(b"\xa3" + u32(out))            # mov [out], eax
                c.extend(b"\x89\x1d" + u32(out + 8))    # mov [out+8], ebx
        else:
            # identity-map the first 2 MiB (user-accessible), enter long mode
            for addr, val in ((0x10000, 0x11007), (0x11000, 0x12007),
                              (0x12000, 0x87)):
                c.extend(b"\xc7\x05" + u32(addr) + u32(val))
            c.extend(b"\xb8" + u32(0x10000) + b"\x0f\x22\xd8")   # cr3
            c.extend(b"\x0f\x20\xe0\x83\xc8\x20\x0f\x22\xe0")  # cr4.PAE
            c.extend(b"\xb9" + u32(0xC0000080) + b"\x0f\x32")     # EFER
            c.extend(b"\x0d" + u32(0x100) + b"\x0f\x30")          # .LME
            c.extend(b"\x0f\x20\xc0\x0d" + u32(0x80000000) + b"\x0f\x22\xc0")
            lm_fix = len(c) + 1
            c.extend(b"\xea" + u32(0) + u16(0x28))      # jmp 0x28:lm64
            lm64 = len(c)
            # CPL 0, 64-bit: QUERY with the full RAX/RBX, RAX stored whole
            c.extend(b"\x48\xb8" + struct.pack("<Q", NR))
            c.extend(b"\x48\xbb" + struct.pack("<Q", BLK_64))
            c.extend(vmcall + b"\x48\xa3" + struct.pack("<Q", OUT + 0x60))
            # iretq to CPL 3: ss, rsp, rflags, cs, rip
            c.extend(b"\x6a\x23\x68" + u32(0x6000) + b"\x6a\x02\x6a\x33")
            r3_fix = len(c) + 2
            c.extend(b"\x48\xb8" + bytes(8) + b"\x50\x48\xcf")
            ring3_at = len(c)
            for insn, out in ((vmcall, OUT + 0x40), (vmmcall, OUT + 0x50)):
                c.extend(b"\x48\xb8" + struct.pack("<Q", NR))
                c.extend(b"\x48\xbb" + struct.pack("<Q", BLK_USER) + insn)
                c.extend(b"\x48\xa3" + struct.pack("<Q", out))  # rax
                c.extend(b"\x48\x89\xd8\x48\xa3" +            # rbx
                         struct.pack("<Q", out + 8))
            c[lm_fix:lm_fix + 4] = u32(BIOS_BASE + lm64)
        # mov dword [USER_DONE], 0x600d (same bytes in 32- and 64-bit mode)
        c.extend(b"\xc7\x04\x25" + u32(USER_DONE) + u32(0x600D))
        c.extend(b"\xeb\xfe")                           # jmp $
        c[pm_fix:pm_fix + 4] = u32(BIOS_BASE + pm32)
        if long64:
            c[r3_fix:r3_fix + 8] = struct.pack("<Q", BIOS_BASE + ring3_at)
        else:
            c[r3_fix:r3_fix + 4] = u32(BIOS_BASE + ring3_at)
        while len(c) % 8:
            c.append(0x90)
        gdt = len(c)
        descs = (0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF,
                 0x00CFFA000000FFFF, 0x00CFF2000000FFFF,
                 0x00AF9A000000FFFF, 0x00AFFA000000FFFF)  # 0x28, 0x33: 64-bit
        for d in descs:
            c.extend(struct.pack("<Q", d))
        gdtr = len(c)
        c.extend(u16(len(descs) * 8 - 1) + u32(BIOS_BASE + gdt))
        c[gdt_fix:gdt_fix + 2] = u16(gdtr)
    else:
        c.extend(b"\xf4\xeb\xfd")                       # hlt; jmp .-1

    # #UD handler: count, skip the 3-byte instruction, iret
    ud = len(c)
    c.extend(b"\x55\x89\xe5\x83\x46\x02\x03\xff\x06" + u16(UD_COUNT))
    c.extend(b"\x5d\xcf")
    c[ud_fix:ud_fix + 2] = u16(ud)

    assert len(c) < 0xFF00
    img[:len(c)] = c
    img[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"        # jmp 0xf000:0
    return img


def check(cond, what):
    if not cond:
        raise Fail(what)
    print(f"  ok  {what}", file=sys.stderr)


def run(qemu, hypercall, mode, limit):
    ring3 = mode != "real"
    deadline = time.monotonic() + limit
    with tempfile.TemporaryDirectory(prefix="pvdma-hc-") as tmp:
        bios = os.path.join(tmp, "fw.bin")
        with open(bios, "wb") as f:
            f.write(firmware(mode))
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(os.path.join(tmp, "qmp"))
        srv.listen(1)
        srv.settimeout(limit)
        argv = ["timeout", "--kill-after=5", str(int(limit)), qemu,
                "-M", "q35", "-accel", "tcg", "-m", "128M", "-nographic",
                "-bios", bios, "-no-reboot",
                "-device", f"pvdma,id=pvdma0,addr=04.0,hypercall={hypercall}",
                "-device", "edu,addr=05.0", "-device", "edu,addr=06.0",
                "-qmp", "unix:" + os.path.join(tmp, "qmp")]
        print(f"== hypercall={hypercall}, firmware {mode}: "
              f"$ {' '.join(argv[4:])}", file=sys.stderr)
        log = open(os.path.join(tmp, "qemu.log"), "w+")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            conn, _ = srv.accept()
            conn.settimeout(limit)
            qmp = QMP(conn, deadline)
            done = USER_DONE if ring3 else REAL_DONE
            dump = os.path.join(tmp, "mem")
            while True:
                qmp.execute("pmemsave", val=DUMP_BASE, size=DUMP_LEN,
                        filename=dump)
                with open(dump, "rb") as f:
                    mem = f.read()

                def d(addr):
                    return struct.unpack_from("<I", mem, addr - DUMP_BASE)[0]
                if d(done):
                    break
                if time.monotonic() > deadline - 5:
                    raise Fail("firmware did not finish: "
                               f"real 0x{d(REAL_DONE):x} user "
                               f"0x{d(USER_DONE):x} #UD {d(UD_COUNT)}")
                time.sleep(0.05)
            info = qmp.execute("query-pvdma")[0]
            eps = {e["requester"]: e for e in info["endpoints"]}
            check_results(hypercall, mode, d, info, eps)
            qmp.execute("quit")
            proc.wait(timeout=10)
        except (Fail, QemuError, OSError, ValueError,
                subprocess.TimeoutExpired) as e:
            log.seek(0)
            raise Fail(f"hypercall={hypercall}: {e}\nQEMU output:\n"
                       f"{log.read()}") from e
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def check_results(hypercall, mode, d, info, eps):
    attached = sorted(r for r, e in eps.items() if e["attached"])
    if hypercall == "off":
        check(info["features"] & 1 == 0, "FEATURES.HYPERCALL clear")
        check(d(UD_COUNT) == 6, f"all 6 calls raised #UD ({d(UD_COUNT)})")
        check(all(d(OUT + o) == NR for o in (0, 4, 8, 0xC)),
              "EAX unchanged after the #UDs")
        check(d(BLK_QUERY + 4) == 0xDEADBEEF, "no block was processed")
        check(attached == [], "no endpoint attached")
        check(info["transports"] == {"doorbell": 0, "hypercall": 0},
              f"no request counted ({info['transports']})")
        return
    check(info["features"] & 1 == 1, "FEATURES.HYPERCALL set")
    check(d(OUT + 0x0) == S_OK, f"CPL 0 VMCALL QUERY 00:05.0 -> OK "
          f"({d(OUT)})")
    check(d(BLK_QUERY + 4) == S_OK and d(BLK_QUERY + 32) & 1 == 0,
          "QUERY block written back: status OK, not ATTACHED")
    check(d(OUT + 0x4) == S_OK, f"CPL 0 VMMCALL ATTACH 00:05.0 -> OK "
          f"({d(OUT + 4)})")
    check(d(OUT + 0x8) == S_STATE, f"CPL 0 VMCALL ATTACH again -> STATE "
          f"({d(OUT + 8)})")
    check(d(OUT + 0xC) == S_NODEV, f"CPL 0 VMMCALL QUERY 01:00.0 -> NODEV "
          f"({d(OUT + 0xC)})")
    check(d(OUT + 0x10) == NOT_NR and d(OUT + 0x28) == NOT_NR and
          d(UD_COUNT) == 2, "other EAX: VMCALL and VMMCALL raise #UD, "
          "EAX unchanged")
    if mode == "long64":
        check(d(OUT + 0x60) == S_OK and d(OUT + 0x64) == 0 and
              d(BLK_64 + 4) == S_OK, "64-bit CPL 0 VMCALL QUERY -> RAX = 0")
        m1 = all(d(OUT + o) == 0xFFFFFFFF for o in (0x40, 0x44, 0x50, 0x54))
        check(m1, "64-bit CPL 3 VMCALL and VMMCALL -> RAX = -1, all 64 bits")
        check(all(d(OUT + o) == BLK_USER and d(OUT + o + 4) == 0
                  for o in (0x48, 0x58)), "CPL 3: RBX unchanged")
    else:
        check(d(OUT + 0x40) == 0xFFFFFFFF and d(OUT + 0x50) == 0xFFFFFFFF,
              "32-bit CPL 3 VMCALL and VMMCALL -> EAX = -1")
        check(d(OUT + 0x48) == BLK_USER and d(OUT + 0x58) == BLK_USER,
              "CPL 3: EBX unchanged")
    check(d(BLK_USER + 4) == 0xDEADBEEF, "CPL 3: block not touched")
    check(attached == ["0000:00:05.0"] or attached == ["00:05.0"],
          f"only 00:05.0 attached ({attached})")
    check(info["last-status"] == 0,
          "LAST_STATUS untouched by hypercalls (doorbell only)")
    # Requests that ran: QUERY, ATTACH, ATTACH, QUERY at CPL 0, and the
    # 64-bit QUERY; CPL 3 calls and #UDs submit nothing.
    calls = 5 if mode == "long64" else 4
    check(info["transports"] == {"doorbell": 0, "hypercall": calls},
          f"query-pvdma counts {calls} hypercalls ({info['transports']})")
    check(info["requests"]["query"] == calls - 2 and
          info["requests"]["attach"] == 2,
          f"requests by op ({info['requests']})")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    qemu = sys.argv[1]
    limit = float(sys.argv[2]) if len(sys.argv) > 2 else 60
    try:
        run(qemu, "auto", "pm32", limit)
        run(qemu, "auto", "long64", limit)
        run(qemu, "off", "real", limit)
    except Fail as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print("PASS: pvdma hypercalls from TCG VMCALL/VMMCALL", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
