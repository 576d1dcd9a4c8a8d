//! The final network as an ONNX model: a graph builder over ONNX's protobuf messages (prost types from
//! `tract_onnx::pb`, generated from onnx.proto), and the walk over [`Network`] that mirrors its evaluation-mode
//! forward pass node by node: no auxiliary head, no drop path, BatchNorm with its running statistics either
//! folded into the convolution before it or kept as `BatchNormalization` nodes.

use super::ModelCard;
use crate::network::{Cell, NetStem, Network};
use crate::ops::{Bn, Conv, FactorizedReduce, Op, Preprocess, ReluConvBn, BN_EPS};
use crate::space::Activation;
use anyhow::{bail, Result};
use prost::Message;
use tch::{Kind, Tensor};
use tract_onnx::pb;

/// The ONNX operator set the exported graphs use.
pub const OPSET: i64 = 17;
/// The ONNX IR version written (IR 8 goes with opset 17 and is read by every runtime of the last years).
pub const IR_VERSION: i64 = 8;
/// Name of the graph's input.
pub const INPUT: &str = "input";
/// Name of the graph's logits output.
pub const LOGITS: &str = "logits";
/// Name of the graph's softmax output.
pub const PROBABILITIES: &str = "probabilities";

/// How to write the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportOptions {
    /// Fold every BatchNorm into the convolution(s) before it (a bias appears); else `BatchNormalization` nodes.
    pub fold_batch_norm: bool,
    /// Take pixels scaled to [0, 1] and normalise inside the graph (`(x - mean) / std` as two nodes), instead
    /// of an input already normalised as in training.
    pub normalize_inside: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { fold_batch_norm: true, normalize_inside: false }
    }
}

/// A value in the graph being built: its name and spatial size (known statically; only the batch is dynamic).
#[derive(Clone, Debug)]
struct Value {
    name: String,
    h: i64,
    w: i64,
}

/// Nodes and initializers of a graph under construction, with fresh names.
#[derive(Default)]
struct Builder {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    counter: usize,
}

fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

/// A float tensor's values in row-major order, whatever its device, layout or kind.
fn floats(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous().flatten(0, -1);
    Ok(Vec::<f32>::try_from(&t)?)
}

impl Builder {
    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>, hint: &str) -> String {
        let out = self.fresh(hint);
        self.node_to(op, inputs, attrs, out)
    }

    /// A node writing the value `out`.
    fn node_to(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>, out: String) -> String {
        self.counter += 1;
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("{op}_{}", self.counter),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn float_init(&mut self, hint: &str, dims: &[i64], data: &[f32]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(pb::TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    fn int_init(&mut self, hint: &str, data: &[i64]) -> String {
        let name = self.fresh(hint);
        self.initializers.push(pb::TensorProto {
            name: name.clone(),
            dims: vec![data.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    fn activation(&mut self, act: Activation, x: &Value) -> Value {
        let name = match act {
            Activation::Relu => self.node("Relu", &[&x.name], vec![], "relu"),
            Activation::Gelu => {
                // x * 0.5 * (1 + erf(x / sqrt 2)): opset 17 has no Gelu.
                let r = self.float_init("sqrt2", &[], &[std::f32::consts::SQRT_2]);
                let half = self.float_init("half", &[], &[0.5]);
                let one = self.float_init("one", &[], &[1.0]);
                let d = self.node("Div", &[&x.name, &r], vec![], "gelu");
                let e = self.node("Erf", &[&d], vec![], "gelu");
                let a = self.node("Add", &[&e, &one], vec![], "gelu");
                let m = self.node("Mul", &[&x.name, &a], vec![], "gelu");
                self.node("Mul", &[&m, &half], vec![], "gelu")
            }
        };
        Value { name, ..x.clone() }
    }

    /// A convolution with extra end padding `(pad_h_end, pad_w_end)` and an optional bias.
    fn conv(&mut self, c: &Conv, x: &Value, extra_end: [i64; 2], weight: Vec<f32>, bias: Option<Vec<f32>>) -> Value {
        let dims = c.weight.size();
        let w = self.float_init("w", &dims, &weight);
        let mut inputs = vec![x.name.clone(), w];
        if let Some(b) = bias {
            inputs.push(self.float_init("b", &[dims[0]], &b));
        }
        let [ph, pw] = c.padding;
        let pads = [ph, pw, ph + extra_end[0], pw + extra_end[1]];
        let attrs = vec![
            ints("kernel_shape", &dims[2..]),
            ints("strides", &c.stride),
            ints("pads", &pads),
            ints("dilations", &c.dilation),
            int("group", c.groups),
        ];
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let name = self.node("Conv", &refs, attrs, "conv");
        let out = |size: i64, i: usize| {
            (size + pads[i] + pads[i + 2] - c.dilation[i] * (dims[2 + i] - 1) - 1) / c.stride[i] + 1
        };
        Value { name, h: out(x.h, 0), w: out(x.w, 1) }
    }

    fn batch_norm(&mut self, bn: &Bn, x: &Value) -> Result<Value> {
        let (mean, var, gamma, beta) = bn_values(bn)?;
        let c = mean.len() as i64;
        let inputs = [
            x.name.clone(),
            self.float_init("bn_scale", &[c], &gamma),
            self.float_init("bn_bias", &[c], &beta),
            self.float_init("bn_mean", &[c], &mean),
            self.float_init("bn_var", &[c], &var),
        ];
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let name = self.node("BatchNormalization", &refs, vec![float("epsilon", BN_EPS as f32)], "bn");
        Ok(Value { name, ..x.clone() })
    }

    /// Convolutions whose concatenated outputs a BatchNorm follows, with the BN folded into them or after them.
    fn convs_bn(&mut self, convs: &[(&Conv, &Value, [i64; 2])], bn: &Bn, fold: bool) -> Result<Value> {
        if bn.is_folded() || convs.iter().any(|(c, _, _)| c.bias.is_some()) {
            bail!("this network's BatchNorms were folded for inference: export it as loaded, before folding");
        }
        let (scale, shift) = bn_affine(bn)?;
        let mut outs = Vec::new();
        let mut offset = 0usize;
        for (conv, x, extra) in convs {
            let w = floats(&conv.weight)?;
            let c_out = conv.weight.size()[0] as usize;
            if fold {
                let per = w.len() / c_out;
                let (s, b) = (&scale[offset..offset + c_out], &shift[offset..offset + c_out]);
                let wf: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * s[i / per]).collect();
                outs.push(self.conv(conv, x, *extra, wf, Some(b.to_vec())));
            } else {
                outs.push(self.conv(conv, x, *extra, w, None));
            }
            offset += c_out;
        }
        if offset != scale.len() {
            bail!("a BatchNorm of {} channels follows convolutions of {offset}", scale.len());
        }
        let y = if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            let names: Vec<&str> = outs.iter().map(|v| v.name.as_str()).collect();
            let name = self.node("Concat", &names, vec![int("axis", 1)], "cat");
            Value { name, ..outs[0].clone() }
        };
        if fold {
            Ok(y)
        } else {
            self.batch_norm(bn, &y)
        }
    }

    fn plain_conv(&mut self, conv: &Conv, x: &Value) -> Result<Value> {
        Ok(self.conv(conv, x, [0, 0], floats(&conv.weight)?, None))
    }

    fn relu_conv_bn(&mut self, m: &ReluConvBn, x: &Value, fold: bool) -> Result<Value> {
        let a = self.activation(m.act, x);
        self.convs_bn(&[(&m.conv, &a, [0, 0])], &m.bn, fold)
    }

    /// FactorizedReduce: two stride-2 1x1 convolutions, the second on the input shifted by one pixel; on odd
    /// sizes the shifted input is zero-padded at the end (here: the convolution's own end padding).
    fn factorized_reduce(&mut self, m: &FactorizedReduce, x: &Value, fold: bool) -> Result<Value> {
        let a = self.activation(m.act, x);
        let starts = self.int_init("starts", &[1, 1]);
        let ends = self.int_init("ends", &[i64::MAX, i64::MAX]);
        let axes = self.int_init("axes", &[2, 3]);
        let name = self.node("Slice", &[&a.name, &starts, &ends, &axes], vec![], "shift");
        let shifted = Value { name, h: a.h - 1, w: a.w - 1 };
        let extra = [a.h % 2, a.w % 2];
        self.convs_bn(&[(&m.conv_1, &a, [0, 0]), (&m.conv_2, &shifted, extra)], &m.bn, fold)
    }

    fn op(&mut self, op: &Op, x: &Value, fold: bool) -> Result<Value> {
        let pool_attrs = |stride: i64| vec![ints("kernel_shape", &[3, 3]), ints("strides", &[stride, stride])];
        let pooled = |v: &Value, s: i64| Value { name: String::new(), h: (v.h - 1) / s + 1, w: (v.w - 1) / s + 1 };
        Ok(match op {
            Op::Identity => x.clone(),
            Op::Zero { stride } => {
                let src = if *stride == 1 {
                    x.clone()
                } else {
                    let starts = self.int_init("starts", &[0, 0]);
                    let ends = self.int_init("ends", &[i64::MAX, i64::MAX]);
                    let axes = self.int_init("axes", &[2, 3]);
                    let steps = self.int_init("steps", &[*stride, *stride]);
                    let name = self.node("Slice", &[&x.name, &starts, &ends, &axes, &steps], vec![], "stride");
                    Value { name, ..pooled(x, *stride) }
                };
                let zero = self.float_init("zero", &[], &[0.0]);
                let name = self.node("Mul", &[&src.name, &zero], vec![], "zero");
                Value { name, ..src }
            }
            Op::MaxPool { stride, bn } | Op::AvgPool { stride, bn } => {
                let mut attrs = pool_attrs(*stride);
                attrs.push(ints("pads", &[1, 1, 1, 1]));
                let kind = if matches!(op, Op::MaxPool { .. }) { "MaxPool" } else { "AveragePool" };
                if kind == "AveragePool" {
                    attrs.push(int("count_include_pad", 0));
                }
                let name = self.node(kind, &[&x.name], attrs, "pool");
                let y = Value { name, ..pooled(x, *stride) };
                match bn {
                    Some(bn) => self.batch_norm(bn, &y)?,
                    None => y,
                }
            }
            Op::Reduce(fr) => self.factorized_reduce(fr, x, fold)?,
            Op::Convs(act, blocks) => {
                let mut y = x.clone();
                for (convs, bn) in blocks {
                    y = self.activation(*act, &y);
                    let (last, first) = convs.split_last().expect("a block has a convolution");
                    for conv in first {
                        y = self.plain_conv(conv, &y)?;
                    }
                    y = self.convs_bn(&[(last, &y, [0, 0])], bn, fold)?;
                }
                y
            }
        })
    }

    fn cell(&mut self, cell: &Cell, s0: &Value, s1: &Value, fold: bool) -> Result<Value> {
        let p0 = match &cell.preprocess0 {
            Preprocess::Reduce(fr) => self.factorized_reduce(fr, s0, fold)?,
            Preprocess::Conv(m) => self.relu_conv_bn(m, s0, fold)?,
        };
        let p1 = self.relu_conv_bn(&cell.preprocess1, s1, fold)?;
        let mut states = vec![p0, p1];
        for i in 0..cell.ops.len() / 2 {
            let a = self.op(&cell.ops[2 * i], &states[cell.indices[2 * i]], fold)?;
            let b = self.op(&cell.ops[2 * i + 1], &states[cell.indices[2 * i + 1]], fold)?;
            if (a.h, a.w) != (b.h, b.w) {
                bail!("node {} of a cell adds maps of {}x{} and {}x{}", i + 2, a.h, a.w, b.h, b.w);
            }
            let name = self.node("Add", &[&a.name, &b.name], vec![], "node");
            states.push(Value { name, ..a });
        }
        let names: Vec<&str> = cell.concat.iter().map(|&i| states[i].name.as_str()).collect();
        let name = self.node("Concat", &names, vec![int("axis", 1)], "cell");
        Ok(Value { name, ..states[cell.concat[0]].clone() })
    }
}

/// A BatchNorm's running mean and variance and its affine weight and bias (1 and 0 without affine).
type BnValues = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn bn_values(bn: &Bn) -> Result<BnValues> {
    let mean = floats(&bn.running_mean)?;
    let var = floats(&bn.running_var)?;
    let c = mean.len();
    let gamma = match &bn.ws {
        Some(w) => floats(w)?,
        None => vec![1.0; c],
    };
    let beta = match &bn.bs {
        Some(b) => floats(b)?,
        None => vec![0.0; c],
    };
    Ok((mean, var, gamma, beta))
}

/// A BatchNorm in evaluation mode as `y = scale * x + shift` per channel (the values inference folds with).
fn bn_affine(bn: &Bn) -> Result<(Vec<f32>, Vec<f32>)> {
    let (scale, shift) = bn.scale_shift();
    Ok((floats(&scale)?, floats(&shift)?))
}

fn tensor_type(dims: &[Option<i64>]) -> pb::TypeProto {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => D::DimValue(*v),
                None => D::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: pb::tensor_proto::DataType::Float as i32,
            shape: Some(pb::TensorShapeProto { dim }),
        })),
        ..Default::default()
    }
}

/// The ONNX model of `net` (evaluation mode) described by `card`, written as `opts` say.
pub fn export(net: &Network, card: &ModelCard, opts: ExportOptions) -> Result<pb::ModelProto> {
    let fold = opts.fold_batch_norm;
    let s = card.shape;
    let (c, h, w) = (s.channels as i64, s.height as i64, s.width as i64);
    let mut b = Builder::default();
    let mut x = Value { name: INPUT.into(), h, w };
    if opts.normalize_inside {
        let mean: Vec<f32> = card.mean.iter().map(|&v| v as f32).collect();
        let std: Vec<f32> = card.std.iter().map(|&v| v as f32).collect();
        let m = b.float_init("mean", &[1, c, 1, 1], &mean);
        let d = b.float_init("std", &[1, c, 1, 1], &std);
        let sub = b.node("Sub", &[&x.name, &m], vec![], "centred");
        x.name = b.node("Div", &[&sub, &d], vec![], "normalized");
    }
    let (mut s0, mut s1) = match &net.stem {
        NetStem::Cifar(stem) => {
            let y = b.convs_bn(&[(&stem.conv, &x, [0, 0])], &stem.bn, fold)?;
            (y.clone(), y)
        }
        NetStem::ImageNet(stem) => {
            let y = b.convs_bn(&[(&stem.conv0a, &x, [0, 0])], &stem.bn0a, fold)?;
            let y = b.activation(Activation::Relu, &y);
            let s0 = b.convs_bn(&[(&stem.conv0b, &y, [0, 0])], &stem.bn0b, fold)?;
            let r = b.activation(Activation::Relu, &s0);
            let s1 = b.convs_bn(&[(&stem.conv1, &r, [0, 0])], &stem.bn1, fold)?;
            (s0, s1)
        }
    };
    for cell in &net.cells {
        let out = b.cell(cell, &s0, &s1, fold)?;
        (s0, s1) = (s1, out);
    }
    let pooled = b.node("GlobalAveragePool", &[&s1.name], vec![], "pool");
    let flat = b.node("Flatten", &[&pooled], vec![int("axis", 1)], "features");
    let wc = &net.classifier.ws;
    let wname = b.float_init("classifier_w", &wc.size(), &floats(wc)?);
    let mut inputs = vec![flat, wname];
    if let Some(bias) = &net.classifier.bs {
        inputs.push(b.float_init("classifier_b", &bias.size(), &floats(bias)?));
    }
    let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    b.node_to("Gemm", &refs, vec![int("transB", 1)], LOGITS.into());
    b.node_to("Softmax", &[LOGITS], vec![int("axis", 1)], PROBABILITIES.into());
    let classes = s.classes as i64;
    let graph = pb::GraphProto {
        name: "darts".into(),
        node: b.nodes,
        initializer: b.initializers,
        input: vec![pb::ValueInfoProto {
            name: INPUT.into(),
            r#type: Some(tensor_type(&[None, Some(c), Some(h), Some(w)])),
            doc_string: card.input_description(opts),
        }],
        output: [(LOGITS, "class scores before softmax"), (PROBABILITIES, "softmax of the logits")]
            .iter()
            .map(|(n, d)| pb::ValueInfoProto {
                name: n.to_string(),
                r#type: Some(tensor_type(&[None, Some(classes)])),
                doc_string: d.to_string(),
            })
            .collect(),
        ..Default::default()
    };
    Ok(pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "darts".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!("DARTS network ({}) trained by darts on {}", card.genotype_name(), card.dataset),
        graph: Some(graph),
        metadata_props: card
            .metadata(opts)
            .into_iter()
            .map(|(key, value)| pb::StringStringEntryProto { key, value })
            .collect(),
        ..Default::default()
    })
}

/// The model's bytes as written to a `.onnx` file.
pub fn to_bytes(model: &pb::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Reads an ONNX model's messages from its bytes.
pub fn from_bytes(bytes: &[u8]) -> Result<pb::ModelProto> {
    Ok(pb::ModelProto::decode(bytes)?)
}

/// Elements of the graph's initializers whose names mark them as trained parameters (convolution kernels and
/// biases, BatchNorm scales and biases, the classifier), running statistics excluded: with BatchNorm kept as
/// nodes this equals the network's parameter count without the auxiliary head.
pub fn parameter_count(model: &pb::ModelProto) -> i64 {
    let graph = model.graph.as_ref();
    graph
        .map(|g| {
            g.initializer
                .iter()
                .filter(|t| {
                    let hint = t.name.rsplit_once('_').map_or(t.name.as_str(), |(h, _)| h);
                    matches!(hint, "w" | "b" | "bn_scale" | "bn_bias" | "classifier_w" | "classifier_b")
                })
                .map(|t| t.dims.iter().product::<i64>())
                .sum()
        })
        .unwrap_or(0)
}
