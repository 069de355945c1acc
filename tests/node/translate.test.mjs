// A Node.js client of dragoman.v1.SpeechService, built from proto/ at run time with
// @grpc/proto-loader: a Translate stream, ListModels, and an error's status details.
// The server's address comes from DRAGOMAN_GRPC_ADDRESS (tests/test_grpc_node.py starts one).
import assert from 'node:assert/strict';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const address = process.env.DRAGOMAN_GRPC_ADDRESS;
assert.ok(address, 'set DRAGOMAN_GRPC_ADDRESS to the server (host:port)');

const definition = protoLoader.loadSync('dragoman/v1/speech.proto', {
  includeDirs: [path.join(root, 'proto')],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { dragoman } = grpc.loadPackageDefinition(definition);
const client = new dragoman.v1.SpeechService(address, grpc.credentials.createInsecure());

// Two seconds of a voiced, syllable-like tone as a 16 kHz mono 16-bit WAV file.
function wav(seconds = 2, rate = 16000) {
  const n = Math.round(seconds * rate);
  const data = Buffer.alloc(44 + 2 * n);
  data.write('RIFF', 0);
  data.writeUInt32LE(36 + 2 * n, 4);
  data.write('WAVEfmt ', 8);
  data.writeUInt32LE(16, 16);
  data.writeUInt16LE(1, 20); // PCM
  data.writeUInt16LE(1, 22); // mono
  data.writeUInt32LE(rate, 24);
  data.writeUInt32LE(2 * rate, 28);
  data.writeUInt16LE(2, 32);
  data.writeUInt16LE(16, 34);
  data.write('data', 36);
  data.writeUInt32LE(2 * n, 40);
  let phase = 0;
  for (let i = 0; i < n; i++) {
    const t = i / rate;
    phase += (2 * Math.PI * (140 + 30 * Math.sin(2 * Math.PI * 0.3 * t))) / rate;
    let v = 0;
    for (let k = 1; k < 6; k++) v += Math.sin(k * phase) / k;
    v *= 0.2 * 0.5 * (1 + Math.sin(2 * Math.PI * 4 * t));
    data.writeInt16LE(Math.round(Math.max(-1, Math.min(1, v)) * 32767), 44 + 2 * i);
  }
  return data;
}

const seconds = (d) => Number(d.seconds) + d.nanos / 1e9;
const deadline = (s) => new Date(Date.now() + s * 1000);

function translate(config, audio) {
  return new Promise((resolve, reject) => {
    const events = [];
    const call = client.Translate({ deadline: deadline(120) });
    call.on('data', (response) => events.push(response));
    call.on('error', reject);
    call.on('end', () => resolve(events));
    call.write({ config });
    for (let i = 0; i < audio.length; i += 16384) call.write({ audio: audio.subarray(i, i + 16384) });
    call.end();
  });
}

test('Translate streams deltas and segments in order, then one summary', async () => {
  const events = await translate({ max_new_tokens: 4, temperature: 1.0, stream_deltas: true, model: 'whisper-1' }, wav());
  const kinds = events.map((e) => e.event);
  assert.equal(kinds.at(-1), 'summary');
  assert.equal(kinds.filter((k) => k === 'summary').length, 1);
  const segments = events.filter((e) => e.event === 'segment').map((e) => e.segment);
  assert.ok(segments.length > 0);
  assert.deepEqual(kinds.slice(0, -1), segments.flatMap(() => ['delta', 'segment']));
  const deltas = events.filter((e) => e.event === 'delta').map((e) => e.delta.text);
  assert.deepEqual(deltas, segments.map((s) => s.text));
  segments.forEach((s, i) => {
    assert.equal(s.id, i);
    assert.ok(seconds(s.end_offset) >= 0 && s.tokens.length > 0);
  });
  const { summary } = events.at(-1);
  assert.equal(summary.text, segments.map((s) => s.text).join(''));
  assert.ok(Math.abs(seconds(summary.duration) - 2) < 0.01);
  assert.ok(summary.usage.completion_tokens > 0);
  assert.ok(summary.language.length >= 2);
});

test('beam search with the fallback off decodes at temperature 0 only', async () => {
  // proto3 optional fields: an explicit false reaches the server (random weights would fall back).
  const config = { max_new_tokens: 4, temperature: 0, temperature_fallback: false, beam_size: 2, patience: 1.5 };
  const events = await translate(config, wav());
  const segments = events.filter((e) => e.event === 'segment').map((e) => e.segment);
  assert.ok(segments.length > 0);
  assert.ok(segments.every((s) => s.temperature === 0));
  const again = (await translate(config, wav())).filter((e) => e.event === 'segment').map((e) => e.segment);
  // The same tokens, text and times; scores to float precision, as a kernel's sum may be ordered
  // differently on another set of CPU threads.
  const scores = ['avg_logprob', 'compression_ratio', 'no_speech_prob'];
  const exact = (s) => Object.fromEntries(Object.entries(s).filter(([k]) => !scores.includes(k)));
  assert.deepEqual(again.map(exact), segments.map(exact));
  again.forEach((s, i) => scores.forEach((k) => {
    assert.ok(Math.abs(s[k] - segments[i][k]) <= 1e-5 * Math.max(1, Math.abs(segments[i][k])), k);
  }));
});

test('ListModels names the served model and its aliases', async () => {
  const response = await new Promise((resolve, reject) =>
    client.ListModels({}, { deadline: deadline(10) }, (err, r) => (err ? reject(err) : resolve(r))));
  assert.equal(response.models.length, 1);
  const model = response.models[0];
  assert.deepEqual(model.aliases, [model.id.split('/').pop(), 'whisper-1']);
  assert.ok(response.models[0].languages.some((l) => l.code === 'en' && l.name === 'english'));
});

test('an unknown language is INVALID_ARGUMENT with google.rpc details', async () => {
  await assert.rejects(translate({ language: 'klingon' }, wav(0.5)), (err) => {
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.match(err.details, /config\.language/);
    assert.equal(err.metadata.get('grpc-status-details-bin').length, 1);
    return true;
  });
});

test('a beam size out of range is INVALID_ARGUMENT naming config.beam_size', async () => {
  await assert.rejects(translate({ beam_size: 11 }, wav(0.5)), (err) => {
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.match(err.details, /config\.beam_size/);
    return true;
  });
});

test.after(() => client.close());
