#!/usr/bin/env node
// The polyglot check: a Node.js client of a running Loracle server, in the two ways a
// non-Python user calls it.
//   1. With the .proto files from protos/ (proto-loader): page through the whole catalog two
//      LoRAs at a time, then stream a generation and verify the reassembled image's SHA-256.
//   2. With server reflection only, as grpcurl does: list the services, resolve
//      loracle.v1.QueryService from the descriptors the server sends, call ListBaseModels.
// Prints one JSON line summarising what it saw; exits 1 on any failure (the line then has
// "ok": false and "error").
//
// Usage: node check.mjs ADDRESS [--token TOKEN] [--ca CA.pem [--cert CERT.pem --key KEY.pem]]
//   --token   sent as `authorization: Bearer TOKEN` on every call
//   --ca      PEM bundle of the CA that signed the server's certificate: use TLS; with
//             --cert and --key (PEM), present a client certificate (mutual TLS)

import { createHash, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

import { LOADER_OPTIONS, ReflectionClient } from './reflection.mjs';

const REPO_PROTOS = fileURLToPath(new URL('../../protos', import.meta.url));
const PAGE_SIZE = 2;
const CALL_SECONDS = 30;
const GENERATION_SECONDS = 180;

function usage(message) {
  process.stderr.write(
    `${message}\nusage: node check.mjs ADDRESS [--token TOKEN] ` +
      '[--ca CA.pem [--cert CERT.pem --key KEY.pem]]\n',
  );
  process.exit(2);
}

function parse(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        token: { type: 'string' },
        ca: { type: 'string' },
        cert: { type: 'string' },
        key: { type: 'string' },
      },
    });
  } catch (err) {
    usage(err.message);
  }
  const { positionals, values } = parsed;
  if (positionals.length !== 1) usage('expected exactly one ADDRESS (host:port)');
  if ((values.cert === undefined) !== (values.key === undefined)) usage('--cert needs --key');
  if (values.cert !== undefined && values.ca === undefined) usage('--cert needs --ca');
  return { address: positionals[0], ...values };
}

function channelCredentials({ ca, cert, key }) {
  if (ca === undefined) return grpc.credentials.createInsecure();
  const read = (path) => (path === undefined ? null : readFileSync(path));
  return grpc.credentials.createSsl(read(ca), read(key), read(cert));
}

function callMetadata(token) {
  const metadata = new grpc.Metadata();
  if (token !== undefined) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline(CALL_SECONDS) }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

// -- 1. With the .proto files ------------------------------------------------------------------

function loadProtos() {
  // google/protobuf/{field_mask,timestamp}.proto are not in protos/: proto-loader resolves the
  // well-known types from the copies protobufjs bundles, so this works offline after npm ci.
  const definition = protoLoader.loadSync(
    ['loracle/v1/query_service.proto', 'loracle/v1/command_service.proto'],
    { ...LOADER_OPTIONS, includeDirs: [REPO_PROTOS] },
  );
  return grpc.loadPackageDefinition(definition).loracle.v1;
}

async function pageCatalog(queries, metadata) {
  const ids = new Set();
  let pages = 0;
  let totalSize = 0;
  let pageToken = '';
  do {
    const page = await unary(
      queries,
      'ListLoras',
      { page_size: PAGE_SIZE, page_token: pageToken },
      metadata,
    );
    pages += 1;
    check(page.loras.length <= PAGE_SIZE, `page ${pages} has ${page.loras.length} LoRAs`);
    for (const lora of page.loras) {
      check(!ids.has(lora.id), `LoRA ${lora.id} appears on two pages`);
      ids.add(lora.id);
    }
    totalSize = page.total_size;
    pageToken = page.next_page_token;
    check(pages <= 10_000, 'the catalog never ends');
  } while (pageToken !== '');
  check(ids.size === totalSize, `paged ${ids.size} LoRAs but total_size is ${totalSize}`);
  return { loras_paged: ids.size, pages, total_size: totalSize };
}

async function generate(commands, metadata) {
  const request = {
    request_id: randomUUID(),
    spec: { prompt: 'a lighthouse at dusk, watercolor', seed: 7, steps: 2, width: 64, height: 64 },
  };
  const call = commands.GenerateImage(request, metadata, { deadline: deadline(GENERATION_SECONDS) });
  const chunks = new Map(); // image index -> Buffer[]
  const sizes = new Map(); // image index -> bytes so far
  const images = [];
  let last = null;
  let events = 0;
  let generationId = '';
  for await (const { event } of call) {
    events += 1;
    generationId = event.generation_id;
    last = event.event;
    if (last === 'image_chunk') {
      const { image_index: index, offset, data } = event.image_chunk;
      const size = sizes.get(index) ?? 0;
      check(Number(offset) === size, `chunk of image ${index} at ${offset}, expected ${size}`);
      chunks.set(index, [...(chunks.get(index) ?? []), data]);
      sizes.set(index, size + data.length);
    } else if (last === 'image_complete') {
      const info = event.image_complete;
      const bytes = Buffer.concat(chunks.get(info.index) ?? []);
      const sha256 = createHash('sha256').update(bytes).digest('hex');
      images.push({
        index: info.index,
        bytes: bytes.length,
        sha256_ok: sha256 === info.sha256 && bytes.length === Number(info.size_bytes),
        mime_type: info.mime_type,
      });
    } else if (last === 'failed') {
      throw new Error(`generation ${generationId} failed: ${event.failed.error}`);
    } else if (last === 'cancelled') {
      throw new Error(`generation ${generationId} was cancelled`);
    }
  }
  check(images.length > 0, 'the generation sent no image');
  check(
    images.every((i) => i.sha256_ok),
    'an image does not match its image_complete.sha256',
  );
  check(last === 'completed', `the stream ended on "${last}", not "completed"`);
  return {
    generation_id: generationId,
    events,
    images: images.length,
    image_bytes: images.reduce((sum, i) => sum + i.bytes, 0),
    mime_type: images[0].mime_type,
    sha256_ok: true,
    completed: true,
  };
}

async function withProtos(address, credentials, metadata) {
  const v1 = loadProtos();
  const queries = new v1.QueryService(address, credentials);
  const commands = new v1.CommandService(address, credentials);
  try {
    return { ...(await pageCatalog(queries, metadata)), ...(await generate(commands, metadata)) };
  } finally {
    queries.close();
    commands.close();
  }
}

// -- 2. With reflection only ---------------------------------------------------------------------

async function withReflection(address, credentials, metadata) {
  const reflection = new ReflectionClient(address, credentials, { metadata });
  let queries = null;
  try {
    const services = await reflection.listServices();
    check(services.includes('loracle.v1.QueryService'), `services listed: ${services}`);
    const QueryService = await reflection.serviceClient('loracle.v1.QueryService');
    queries = new QueryService(address, credentials);
    const { models } = await unary(queries, 'ListBaseModels', {}, metadata);
    check(models.length > 0, 'ListBaseModels returned no model');
    return {
      services,
      reflection_methods: Object.keys(QueryService.service).sort(),
      reflection_base_models: models.map((m) => m.name),
      reflection_base_models_ready: models.every((m) => m.ready),
    };
  } finally {
    queries?.close();
    reflection.close();
  }
}

// -----------------------------------------------------------------------------------------------

function describe(err) {
  if (typeof err?.code === 'number' && 'details' in err) {
    return `${grpc.status[err.code] ?? err.code}: ${err.details}`;
  }
  return err?.message ?? String(err);
}

async function main() {
  const options = parse(process.argv.slice(2));
  const credentials = channelCredentials(options);
  const metadata = callMetadata(options.token);
  const summary = { ok: false, address: options.address };
  const started = performance.now();
  try {
    Object.assign(summary, await withProtos(options.address, credentials, metadata));
    Object.assign(summary, await withReflection(options.address, credentials, metadata));
    summary.ok = true;
  } catch (err) {
    summary.error = describe(err);
  }
  summary.seconds = Math.round(performance.now() - started) / 1000;
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  process.exitCode = summary.ok ? 0 : 1;
}

await main();
