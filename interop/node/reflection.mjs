// A gRPC server-reflection client, the way grpcurl works: ask the server's reflection service
// for the services it serves and for the FileDescriptorProtos that declare a symbol (with
// their imports), build a package definition from those descriptors, and call methods on it
// without any local .proto file of the service. Only the reflection protocol's own proto
// (grpc/reflection/v1alpha/reflection.proto, shipped beside this file) is read from disk.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const require = createRequire(import.meta.url);
// protobufjs has no ESM entry for its descriptor extension; proto-loader loads it the same way.
const descriptor = require('protobufjs/ext/descriptor');

const REFLECTION_PROTOS = fileURLToPath(new URL('./protos', import.meta.url));

// How generated clients see messages: field names as in the .proto (like grpcurl's JSON and
// the Python client), 64-bit integers as strings, enums by name, and oneofs named by a
// virtual field holding the name of the member that is set.
export const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});

const reflectionPackage = grpc.loadPackageDefinition(
  protoLoader.loadSync('grpc/reflection/v1alpha/reflection.proto', {
    ...LOADER_OPTIONS,
    includeDirs: [REFLECTION_PROTOS],
  }),
);
const ServerReflection = reflectionPackage.grpc.reflection.v1alpha.ServerReflection;

export class ReflectionClient {
  /**
   * @param {string} address host:port
   * @param {grpc.ChannelCredentials} credentials
   * @param {{metadata?: grpc.Metadata, deadlineSeconds?: number}} options
   */
  constructor(address, credentials, { metadata = new grpc.Metadata(), deadlineSeconds = 30 } = {}) {
    this.address = address;
    this.credentials = credentials;
    this.metadata = metadata;
    this.deadlineSeconds = deadlineSeconds;
    this.client = new ServerReflection(address, credentials);
    this.call = null;
    this.pending = [];
  }

  /** Full names of the services the server serves, sorted. */
  async listServices() {
    const response = await this.ask({ list_services: '' });
    return response.list_services_response.service.map((s) => s.name).sort();
  }

  /**
   * The serialized FileDescriptorProtos declaring `symbol` and everything they import, by
   * file name. The server sends the imports with the file; any it leaves out (it may skip
   * files sent earlier on the stream) are asked for by name.
   */
  async fileDescriptors(symbol) {
    const files = new Map();
    const add = (response) => {
      for (const bytes of response.file_descriptor_response.file_descriptor_proto) {
        const file = descriptor.FileDescriptorProto.decode(bytes);
        if (!files.has(file.name)) files.set(file.name, { bytes, imports: file.dependency });
      }
    };
    add(await this.ask({ file_containing_symbol: symbol }));
    for (;;) {
      const missing = [...files.values()]
        .flatMap((f) => f.imports)
        .filter((name) => !files.has(name));
      if (missing.length === 0) break;
      add(await this.ask({ file_by_filename: missing[0] }));
    }
    return new Map([...files].map(([name, f]) => [name, f.bytes]));
  }

  /**
   * A client constructor for the service `symbol` (e.g. "loracle.v1.QueryService"), built
   * from the descriptors the server sent: `new (await r.serviceClient(...))(address, creds)`.
   */
  async serviceClient(symbol, options = LOADER_OPTIONS) {
    const files = await this.fileDescriptors(symbol);
    // A FileDescriptorSet is `repeated FileDescriptorProto file = 1`: each file, length-delimited.
    const writer = protobuf.Writer.create();
    for (const bytes of files.values()) writer.uint32((1 << 3) | 2).bytes(bytes);
    const definition = protoLoader.loadFileDescriptorSetFromBuffer(writer.finish(), options);
    const root = grpc.loadPackageDefinition(definition);
    const Client = symbol.split('.').reduce((node, part) => node?.[part], root);
    if (typeof Client !== 'function') {
      throw new Error(`reflection: ${symbol} is not a service in the descriptors the server sent`);
    }
    return Client;
  }

  /** Ends the reflection stream and closes the channel. */
  close() {
    this.call?.end();
    this.client.close();
  }

  // One request on the shared bidirectional stream; the server answers requests in order.
  ask(request) {
    if (this.call === null) this.open();
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve, reject });
      this.call.write(request);
    });
  }

  open() {
    const deadline = new Date(Date.now() + this.deadlineSeconds * 1000);
    this.call = this.client.ServerReflectionInfo(this.metadata, { deadline });
    this.call.on('data', (response) => {
      const waiter = this.pending.shift();
      if (waiter === undefined) return;
      if (response.message_response === 'error_response') {
        const { error_code: code, error_message: message } = response.error_response;
        waiter.reject(new Error(`reflection: ${message} (${grpc.status[code] ?? code})`));
      } else {
        waiter.resolve(response);
      }
    });
    const failAll = (error) => {
      for (const waiter of this.pending.splice(0)) waiter.reject(error);
      this.call = null;
    };
    this.call.on('error', failAll);
    this.call.on('end', () => failAll(new Error('reflection: the server ended the stream')));
  }
}
