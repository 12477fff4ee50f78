// The graph inputs of a chosen .onnx file, read in the browser before anything is uploaded, so the form can ask
// for the shape of inputs whose dimensions the model leaves open. Only the protobuf framing is walked: weights
// are skipped by their length, never read. The server checks the model again in its job process.
"use strict";

const ONNX_WINDOW = 64 * 1024;
const ONNX_MAX_FIELDS = 2000000; // give up on files that are not the models they claim to be
const ONNX_NAME_CHARS = 200;

class OnnxByteReader {
  constructor(file) {
    this.file = file;
    this.start = 0;
    this.buf = new Uint8Array(0);
    this.seen = 0; // fields walked so far
  }

  async bytes(pos, n) {
    if (pos < this.start || pos + n > this.start + this.buf.length) {
      const end = Math.min(this.file.size, pos + Math.max(n, ONNX_WINDOW));
      this.buf = new Uint8Array(await this.file.slice(pos, end).arrayBuffer());
      this.start = pos;
      if (this.buf.length < n) throw new Error("truncated");
    }
    return this.buf.subarray(pos - this.start, pos - this.start + n);
  }

  async varint(pos) {
    const bytes = await this.bytes(pos, Math.min(10, this.file.size - pos));
    let value = 0;
    for (let i = 0; i < bytes.length; i += 1) {
      value += (bytes[i] & 0x7f) * 2 ** (7 * i);
      if (!(bytes[i] & 0x80)) return {value, pos: pos + i + 1, negative: i === 9};
    }
    throw new Error("bad varint");
  }

  // Each field of the message between start and end: {field, value} for numbers, {field, start, end} for bytes.
  async *fields(start, end) {
    let pos = start;
    while (pos < end) {
      if ((this.seen += 1) > ONNX_MAX_FIELDS) throw new Error("too many fields");
      const tag = await this.varint(pos);
      const field = Math.floor(tag.value / 8);
      const wire = tag.value % 8;
      pos = tag.pos;
      if (wire === 0) {
        const v = await this.varint(pos);
        pos = v.pos;
        yield {field, value: v.negative ? null : v.value};
      } else if (wire === 2) {
        const len = await this.varint(pos);
        if (len.pos + len.value > end) throw new Error("field past its message");
        yield {field, start: len.pos, end: len.pos + len.value};
        pos = len.pos + len.value;
      } else if (wire === 1) pos += 8;
      else if (wire === 5) pos += 4;
      else throw new Error("not protobuf");
    }
  }

  async text(f) {
    const n = Math.min(f.end - f.start, ONNX_NAME_CHARS);
    return new TextDecoder().decode(await this.bytes(f.start, n));
  }
}

// ValueInfoProto -> {name, dims}: dims are numbers, names of symbolic dimensions, or "?" for unnamed ones.
async function onnxValueInfo(r, start, end) {
  const info = {name: "", dims: null};
  for await (const f of r.fields(start, end)) {
    if (f.field === 1 && f.start !== undefined) info.name = await r.text(f);
    if (f.field !== 2 || f.start === undefined) continue; // type
    for await (const t of r.fields(f.start, f.end)) {
      if (t.field !== 1 || t.start === undefined) continue; // tensor_type
      for await (const s of r.fields(t.start, t.end)) {
        if (s.field !== 2 || s.start === undefined) continue; // shape
        info.dims = [];
        for await (const d of r.fields(s.start, s.end)) {
          if (d.field !== 1 || d.start === undefined) continue;
          let dim = "?";
          for await (const v of r.fields(d.start, d.end)) {
            if (v.field === 1 && v.value !== undefined && v.value !== null) dim = v.value;
            if (v.field === 2 && v.start !== undefined) dim = (await r.text(v)) || "?";
          }
          info.dims.push(dim);
        }
      }
    }
  }
  return info;
}

// The inputs a user feeds: graph inputs that are not also initializers (older models list weights as inputs).
async function onnxInputs(file) {
  const r = new OnnxByteReader(file);
  let graph = null;
  for await (const f of r.fields(0, file.size)) if (f.field === 7 && f.start !== undefined) graph = f;
  if (!graph) throw new Error("no graph");
  const inputs = [];
  const weights = new Set();
  for await (const f of r.fields(graph.start, graph.end)) {
    if (f.field === 11 && f.start !== undefined) inputs.push(await onnxValueInfo(r, f.start, f.end));
    if (f.field === 5 && f.start !== undefined) {
      for await (const t of r.fields(f.start, f.end)) if (t.field === 8 && t.start !== undefined) weights.add(await r.text(t));
    }
  }
  return inputs.filter((i) => !weights.has(i.name));
}

// Inputs with an open dimension past the first (the batch dimension, which defaults to 1).
function openInputs(inputs) {
  return inputs.filter((i) => Array.isArray(i.dims) && i.dims.slice(1).some((d) => typeof d !== "number"));
}
