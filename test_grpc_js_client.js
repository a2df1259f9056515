// The tests' grpc-js client (test_proto_works_unchanged_from_grpc_js): loads jobworker.proto
// unchanged with proto-loader, starts a job as NAME over mutual TLS, streams its output and
// prints one JSON line: the output chunks and the final status, or the status code of an error.
// With `attach`, it starts `sort` with a stdin pipe and sorts two lines through Attach (the
// bidirectional call): one JSON line with the output and the final state.
//
//     node test_grpc_js_client.js PROTO HOST:PORT CERTS_DIR NAME [attach]
'use strict';
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');
const fs = require('fs');
const [proto, addr, dir, name, mode] = process.argv.slice(2);
const def = loader.loadSync(proto, {keepCase: true, enums: String, longs: String, defaults: true,
                                    oneofs: true});
const pkg = grpc.loadPackageDefinition(def).jobworker.v1;
const creds = grpc.credentials.createSsl(fs.readFileSync(`${dir}/ca.crt`),
  fs.readFileSync(`${dir}/${name}.key`), fs.readFileSync(`${dir}/${name}.crt`));
const client = new pkg.JobService(addr, creds);
if (mode === 'attach') {
  client.Start({name: 'sort', stdin: 'STDIN_MODE_PIPE'}, (err, res) => {
    if (err) { console.log(JSON.stringify({start_error: err.code})); process.exit(0); }
    let out = ''; let final = null;
    const call = client.Attach();
    call.on('data', m => {
      if (m.batch) out += Buffer.from(m.batch.data).toString();
      if (m.final_status) final = m.final_status;
    });
    call.on('error', e => { console.log(JSON.stringify({attach_error: e.code})); process.exit(1); });
    call.on('end', () => {
      console.log(JSON.stringify({out, state: final.state, stdin: final.stdin}));
      process.exit(0);
    });
    call.write({start: {job_id: res.job_id, offset: 0}});
    call.write({input: Buffer.from('b\na\n')});
    call.write({eof: true});
  });
  return;
}
client.Start({name: 'sh', args: ['-c', 'echo from node; sleep 0.1; echo err >&2'],
              resources: {cpu_quota: '50%', memory_limit: '64M'}}, (err, res) => {
  if (err) { console.log(JSON.stringify({start_error: err.code})); process.exit(0); }
  const out = []; let final = null;
  const call = client.Stream({job_id: res.job_id, offset: 0});
  call.on('data', m => {
    if (m.chunk) out.push([m.chunk.stream, Buffer.from(m.chunk.data).toString()]);
    if (m.final_status) final = m.final_status;
  });
  call.on('error', e => { console.log(JSON.stringify({stream_error: e.code})); process.exit(1); });
  call.on('end', () => {
    console.log(JSON.stringify({job_id: res.job_id, out, state: final.state,
                                owner: final.owner, memory: final.limits.memory_bytes}));
    process.exit(0);
  });
});
