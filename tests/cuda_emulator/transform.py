# Turns a .cu (or warp_mma.h) into C++ for the emulator: kernel launches -> emu::launch (arguments
# copied at launch), extern __shared__ -> the launch's dynamic buffer, __shared__ -> per-block
# poisoned statics (one per host thread, which runs its streams' kernels), inline PTX (ldmatrix, mma, cp.async, named barriers,
# wgmma and its fences) -> emulated primitives.
import re, sys


def find_callee_start(s, i):
    j = i
    while True:
        while j > 0 and s[j - 1].isspace():
            j -= 1
        if s[j - 1] == '>':
            depth, k = 0, j - 1
            while True:
                if s[k] == '>': depth += 1
                elif s[k] == '<':
                    depth -= 1
                    if depth == 0: break
                k -= 1
            j = k
            continue
        k = j
        while k > 0 and (s[k - 1].isalnum() or s[k - 1] in '_:'):
            k -= 1
        return k


def balanced(s, i, open_c, close_c):
    depth, k = 0, i
    while True:
        if s[k] == open_c: depth += 1
        elif s[k] == close_c:
            depth -= 1
            if depth == 0: return k
        k += 1


def split_top(s):
    parts, depth, cur = [], 0, ''
    for c in s:
        if c in '([{': depth += 1
        if c in ')]}': depth -= 1
        if c == ',' and depth == 0:
            parts.append(cur); cur = ''
        else:
            cur += c
    parts.append(cur)
    return [p.strip() for p in parts]


def launches(s):
    out, pos, n = '', 0, 0
    while True:
        i = s.find('<<<', pos)
        if i < 0:
            out += s[pos:]
            break
        start = find_callee_start(s, i)
        callee = s[start:i].strip()
        end_cfg = s.find('>>>', i)
        cfg = split_top(s[i + 3:end_cfg])
        p = s.find('(', end_cfg)
        q = balanced(s, p, '(', ')')
        args = s[p + 1:q]
        grid, block = cfg[0], cfg[1]
        smem = cfg[2] if len(cfg) > 2 else '0'
        stream = cfg[3] if len(cfg) > 3 else 'nullptr'
        arglist = (', ' + args) if args.strip() else ''
        out += s[pos:start]
        out += (f'::emu::launch(::emu::fn_id({callee}), dim3({grid}), dim3({block}), size_t({smem}), {stream}, '
                f'[=](auto... emu_args) {{ {callee}(emu_args...); }}{arglist})')
        pos = q + 1
        n += 1
    return out, n


def shared(s):
    s = re.sub(r'extern __shared__ (?:__align__\(\d+\) )?([\w: ]+?) (\w+)\[\];',
               r'\1* \2 = reinterpret_cast<\1*>(::emu::shared_mem());', s)

    def static_shared(m):
        typ, decls = m.group(2), split_top(m.group(3))
        out = []
        for d in decls:
            dm = re.fullmatch(r'(\w+)((?:\[[^\]]+\])*)', d)
            assert dm, d
            name, dims = dm.group(1), dm.group(2)
            out.append(f'static thread_local ::emu::BlockStatic<{typ}{dims}> emu_shared_{name}; auto& {name} = emu_shared_{name}.get();')
        return ' '.join(out)

    s = re.sub(r'__shared__\s+(__align__\(\d+\)\s+)?([\w:]+)\s+([^;]+);', static_shared, s)
    assert '__shared__' not in s, 'untransformed __shared__'
    return s


def asm(s):
    def replace(m):
        text = m.group(0)
        if re.match(r'asm volatile\(""', text):
            return ';'  # a register pin: nothing to emulate
        if 'wgmma.mma_async' in text:
            w = re.search(r'\.m64n(\d+)k16\.f32\.bf16\.bf16', text)
            assert w, text
            # The immediates after scale-d: scale-a, scale-b, then trans-a (shared-memory A only)
            # and trans-b. A in registers: a brace list after the accumulators' one.
            imm = re.search(r'p, 1, 1, (?:(0), )?([01]);', text)
            assert imm, 'wgmma scales other than 1 are not emulated: ' + text
            if re.search(r'\}, (?:"\s*")?\{%', text):
                assert imm.group(1) is None, text
                return f'::emu::warpgroup_mma_registers(d, {w.group(1)}, a, b, accumulate, {imm.group(2)});'
            assert imm.group(1) == '0', 'an M-major A is not emulated: ' + text
            return f'::emu::warpgroup_mma(d, {w.group(1)}, a, b, accumulate, {imm.group(2)});'
        if 'wgmma.fence' in text:
            return '::emu::warpgroup_fence();'
        if 'wgmma.commit_group' in text:
            return '::emu::warpgroup_commit();'
        if 'wgmma.wait_group' in text:
            return '::emu::warpgroup_wait(kPending);'
        if 'fence.proxy.async' in text:
            return '::emu::fence_proxy_async();'
        if 'ldmatrix' in text:
            count = 4 if '.x4' in text else 2
            return f'::emu::ldmatrix(r, {count}, row, {"true" if ".trans" in text else "false"});'
        if 'mma.sync' in text:
            return '::emu::mma_m16n8k16(c, a, b0, b1);'
        if 'cp.async.cg.shared.global' in text:
            assert '16, %2' in text and 'valid ? 16 : 0' in text, text
            return '::emu::copy_async(dst, src, 16, valid ? 0 : 16);'
        if 'bar.sync' in text:
            return '::emu::named_barrier_sync(id, threads, __LINE__);'
        if 'bar.arrive' in text:
            return '::emu::named_barrier_arrive(id, threads, __LINE__);'
        if 'cp.async.commit_group' in text:
            return '::emu::copy_async_commit();'
        w = re.search(r'cp\.async\.wait_group (\d+)', text)
        if w:
            return f'::emu::copy_async_wait({w.group(1)});'
        raise SystemExit('unknown asm: ' + text)
    return re.sub(r'asm(?:\s+volatile)?\s*\((?:[^;]|;\\n)*?\);', replace, s, flags=re.S)


src, dst = sys.argv[1], sys.argv[2]
s = open(src).read()
s, n = launches(s)
s = shared(s)
s = asm(s)
assert 'asm' not in re.sub(r'//.*', '', s), 'untransformed asm'
if src.endswith('.cu'):
    s = '#include "shim.h"\n' + s
open(dst, 'w').write(s)
print(f'{src}: {n} launches')
