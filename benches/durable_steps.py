#!/usr/bin/env python3
"""Counts the durable syscalls in `strace -f -y` logs by the file they touch, per job.
usage: classify.py N_JOBS LOG..."""
import re, sys, collections
n = int(sys.argv[1]); files = sys.argv[2:]
c = collections.Counter()
line_re = re.compile(r'^\d+\s+(\w+)\((.*)$')
def kind(call, p):
    b = p.rsplit('/', 1)[-1]
    is_dir_sync = call in ('fsync', 'fdatasync') and not re.search(r'\.[A-Za-z0-9]+$', b)
    if '/state/' in p and b == 'db': return 'sled log flush (state/<w>/db)'
    if b.startswith('.owner') or b == '.owner': return '.owner (job folder claim)'
    if 'build-place' in b: return '.build-place (job folder)'
    if 'mic.conf' in b: return '.build-tmp/mic.conf (job folder)'
    if b.endswith('.ks') or re.search(r'\.ks\.\d+\.\d+\.tmp$', b): return 'kickstart <name>.ks'
    if 'SHA256SUMS' in b: return 'SHA256SUMS'
    if 'provenance' in b: return 'provenance.json'
    if '/spool/hosts' in p: return 'hosts/<w>.json (heartbeat, timed)'
    if '.alive' in b: return 'active/<w>/.alive (heartbeat, timed)'
    if 'mark' in b or b.endswith('.hwm'): return 'high-water mark (timed)'
    if '/outbox' in p: return 'outbox reply' + (' (dir)' if is_dir_sync else '')
    if '/active' in p: return 'active/ (claim rename / kept body)' + (' (dir)' if is_dir_sync else '')
    if '/rejected' in p: return 'rejected/'
    if '/images/requests/' in p and is_dir_sync: return 'job folder (dir fsync)'
    if '/state' in p: return 'state/ other: ' + b
    return 'other: ' + p[-50:]
for f in files:
    for line in open(f, errors='replace'):
        if 'resumed>' in line: continue
        m = line_re.match(line)
        if not m: continue
        call, args = m.groups()
        if call not in ('fsync','fdatasync','sync_file_range','syncfs','rename','renameat','renameat2','link','linkat'): continue
        if call.startswith('rename') or call.startswith('link'):
            strs = re.findall(r'"([^"]*)"', args)
            target = strs[-1] if strs else '?'
            if not target.startswith('/'):
                dirs = re.findall(r'<([^>]*)>', args)
                target = (dirs[-1] if dirs else '') + '/' + target
        else:
            ps = re.findall(r'<([^>]*)>', args); target = ps[0] if ps else '?'
        c[(kind(call, target), call)] += 1
tot = collections.Counter()
for (k, call), v in sorted(c.items()):
    print(f'{k:45s} {call:16s} {v:7d} {v/n:7.2f}/job')
    tot[call in ('fsync','fdatasync','sync_file_range','syncfs')] += v
print(f'total syncs {tot[True]/n:.2f}/job, renames/links {tot[False]/n:.2f}/job')
