"""The original DARTS search code (quark0/darts: operations.py, model_search.py, architect.py), condensed and
updated for PyTorch 2.x, used as the reference our Rust implementation is checked and benchmarked against.

Also the network trained after search (model.py: NetworkCIFAR, NetworkImageNet).

Usage:
  python bench/pytorch_darts.py count [--channels 16 --layers 8 --classes 10 --in-channels 3]
  python bench/pytorch_darts.py count-final --genotype "Genotype(...)" --channels 36 --layers 20 [--imagenet]
  python bench/pytorch_darts.py bench-final --genotype "Genotype(...)" --channels 36 --layers 20 --batch 96
  python bench/pytorch_darts.py bench --batch 64 --size 32 --channels 16 --layers 8 --repeats 3 --threads 2
"""
import argparse, json, resource, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRIMITIVES = ['none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect',
              'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5']

OPS = {
    'none': lambda C, stride, affine: Zero(stride),
    'avg_pool_3x3': lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    'max_pool_3x3': lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    'skip_connect': lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    'sep_conv_3x3': lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    'sep_conv_5x5': lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    'sep_conv_7x7': lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    'dil_conv_3x3': lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    'dil_conv_5x5': lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
                                nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def channel_shuffle(x, groups):
    # PC-DARTS model_search.py
    batchsize, num_channels, height, width = x.data.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class MixedOp(nn.Module):
    """DARTS' MixedOp; with k > 1 PC-DARTS' (partial channels: ops on C // k channels, channel shuffle); with
    aux_skip DARTS-' (Meituan-AutoML/DARTS- model_search.py: + beta * auxiliary_op(x))."""

    def __init__(self, C, stride, k=1, aux_skip=None):
        super().__init__()
        self._ops = nn.ModuleList()
        self.k = k
        self.aux_skip = aux_skip
        if aux_skip is not None:
            self.auxiliary_op = FactorizedReduce(C, C, affine=False) if stride == 2 else Identity()
        self.mp = nn.MaxPool2d(2, 2)
        for primitive in PRIMITIVES:
            op = OPS[primitive](C // k, stride, False)
            if 'pool' in primitive:
                op = nn.Sequential(op, nn.BatchNorm2d(C // k, affine=False))
            self._ops.append(op)

    def forward(self, x, weights):
        res = self._relaxed(x, weights)
        if self.aux_skip is not None:
            res = res + self.auxiliary_op(x) * self.aux_skip
        return res

    def _relaxed(self, x, weights):
        if self.k == 1:
            return sum(w * op(x) for w, op in zip(weights, self._ops))
        dim_2 = x.shape[1]
        xtemp = x[:, :dim_2 // self.k, :, :]
        xtemp2 = x[:, dim_2 // self.k:, :, :]
        temp1 = sum(w * op(xtemp) for w, op in zip(weights, self._ops))
        if temp1.shape[2] == x.shape[2]:
            ans = torch.cat([temp1, xtemp2], dim=1)
        else:
            ans = torch.cat([temp1, self.mp(xtemp2)], dim=1)
        return channel_shuffle(ans, self.k)


class Cell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, k=1, aux_skip=None):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self._steps = steps
        self._multiplier = multiplier
        self._ops = nn.ModuleList()
        for i in range(self._steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self._ops.append(MixedOp(C, stride, k, aux_skip))

    def forward(self, s0, s1, weights, weights2=None):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        offset = 0
        for i in range(self._steps):
            if weights2 is None:
                s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            else:
                s = sum(weights2[offset + j] * self._ops[offset + j](h, weights[offset + j])
                        for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
    def __init__(self, C, num_classes, layers, steps=4, multiplier=4, stem_multiplier=3, in_channels=3, k=1,
                 edge_norm=False, aux_skip=None):
        super().__init__()
        self._C, self._num_classes, self._layers = C, num_classes, layers
        self.edge_norm = edge_norm
        self._steps, self._multiplier = steps, multiplier
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, k, aux_skip)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        n_edges = sum(1 for i in range(self._steps) for n in range(2 + i))
        self.alphas_normal = (1e-3 * torch.randn(n_edges, len(PRIMITIVES))).requires_grad_(True)
        self.alphas_reduce = (1e-3 * torch.randn(n_edges, len(PRIMITIVES))).requires_grad_(True)
        self.betas_normal = (1e-3 * torch.randn(n_edges)).requires_grad_(True)
        self.betas_reduce = (1e-3 * torch.randn(n_edges)).requires_grad_(True)

    def arch_parameters(self):
        if self.edge_norm:
            return [self.alphas_normal, self.alphas_reduce, self.betas_normal, self.betas_reduce]
        return [self.alphas_normal, self.alphas_reduce]

    def _edge_weights(self, betas):
        # PC-DARTS model_search.py Network.forward: softmax over each node's incoming edges.
        n, start = 3, 2
        weights2 = F.softmax(betas[0:2], dim=-1)
        for i in range(self._steps - 1):
            end = start + n
            weights2 = torch.cat([weights2, F.softmax(betas[start:end], dim=-1)], dim=0)
            start = end
            n += 1
        return weights2

    def forward(self, input):
        s0 = s1 = self.stem(input)
        for cell in self.cells:
            weights = F.softmax(self.alphas_reduce if cell.reduction else self.alphas_normal, dim=-1)
            weights2 = None
            if self.edge_norm:
                weights2 = self._edge_weights(self.betas_reduce if cell.reduction else self.betas_normal)
            s0, s1 = s1, cell(s0, s1, weights, weights2)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1))

    def _loss(self, input, target):
        return F.cross_entropy(self(input), target)


def _concat(xs):
    return torch.cat([x.reshape(-1) for x in xs])


class Architect:
    """architect.py: first-order and unrolled (second-order) alpha steps."""

    def __init__(self, model, momentum=0.9, wd=3e-4, lr=3e-4, arch_wd=1e-3):
        self.model, self.momentum, self.wd = model, momentum, wd
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=arch_wd)

    def step(self, xt, yt, xv, yv, eta, w_opt, unrolled):
        self.optimizer.zero_grad()
        if unrolled:
            self._backward_step_unrolled(xt, yt, xv, yv, eta, w_opt)
        else:
            self.model._loss(xv, yv).backward()
        self.optimizer.step()

    def _backward_step_unrolled(self, xt, yt, xv, yv, eta, w_opt):
        params = list(self.model.parameters())
        loss = self.model._loss(xt, yt)
        theta = _concat(params).data
        try:
            moment = _concat(w_opt.state[v]['momentum_buffer'] for v in params).mul_(self.momentum)
        except KeyError:
            moment = torch.zeros_like(theta)
        dtheta = _concat(torch.autograd.grad(loss, params)).data + self.wd * theta
        backup = [p.data.clone() for p in params]
        new = theta - eta * (moment + dtheta)
        offset = 0
        for p in params:
            n = p.numel()
            p.data.copy_(new[offset:offset + n].view_as(p))
            offset += n
        unrolled_loss = self.model._loss(xv, yv)
        grads = torch.autograd.grad(unrolled_loss, self.model.arch_parameters() + params)
        dalpha, vector = list(grads[:2]), [g.data for g in grads[2:]]
        for p, b in zip(params, backup):
            p.data.copy_(b)
        implicit = self._hessian_vector_product(vector, xt, yt)
        for a, g, ig in zip(self.model.arch_parameters(), dalpha, implicit):
            a.grad = g - eta * ig

    def _hessian_vector_product(self, vector, x, y, r=1e-2):
        R = r / _concat(vector).norm()
        params = list(self.model.parameters())
        for p, v in zip(params, vector):
            p.data.add_(v, alpha=R)
        gp = torch.autograd.grad(self.model._loss(x, y), self.model.arch_parameters())
        for p, v in zip(params, vector):
            p.data.sub_(v, alpha=2 * R)
        gn = torch.autograd.grad(self.model._loss(x, y), self.model.arch_parameters())
        for p, v in zip(params, vector):
            p.data.add_(v, alpha=R)
        return [(a - b).div_(2 * R) for a, b in zip(gp, gn)]


# ---- model.py: the network trained after search --------------------------------------------------------

from collections import namedtuple

Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')
OPS['conv_7x1_1x7'] = lambda C, stride, affine: nn.Sequential(
    nn.ReLU(inplace=False),
    nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
    nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
    nn.BatchNorm2d(C, affine=affine))


def drop_path(x, drop_prob):
    if drop_prob > 0.:
        keep_prob = 1. - drop_prob
        mask = torch.empty(x.size(0), 1, 1, 1, device=x.device).bernoulli_(keep_prob)
        x = x.div(keep_prob) * mask
    return x


class EvalCell(nn.Module):
    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        op_names, indices = zip(*(genotype.reduce if reduction else genotype.normal))
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self._steps = len(op_names) // 2
        self._concat = concat
        self.multiplier = len(concat)
        self._ops = nn.ModuleList()
        for name, index in zip(op_names, indices):
            stride = 2 if reduction and index < 2 else 1
            self._ops += [OPS[name](C, stride, True)]
        self._indices = indices

    def forward(self, s0, s1, drop_prob):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            h1 = self._ops[2 * i](states[self._indices[2 * i]])
            h2 = self._ops[2 * i + 1](states[self._indices[2 * i + 1]])
            if self.training and drop_prob > 0.:
                if not isinstance(self._ops[2 * i], Identity):
                    h1 = drop_path(h1, drop_prob)
                if not isinstance(self._ops[2 * i + 1], Identity):
                    h2 = drop_path(h2, drop_prob)
            states += [h1 + h2]
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHead(nn.Module):
    def __init__(self, C, num_classes, imagenet):
        super().__init__()
        layers = [nn.ReLU(inplace=True),
                  nn.AvgPool2d(5, stride=2 if imagenet else 3, padding=0, count_include_pad=False),
                  nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
                  nn.Conv2d(128, 768, 2, bias=False)]
        if not imagenet:
            layers.append(nn.BatchNorm2d(768))
        layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class EvalNetwork(nn.Module):
    """NetworkCIFAR, or NetworkImageNet with imagenet=True."""

    def __init__(self, C, num_classes, layers, auxiliary, genotype, imagenet=False, in_channels=3):
        super().__init__()
        self._layers, self._auxiliary, self.imagenet = layers, auxiliary, imagenet
        self.drop_path_prob = 0.
        if imagenet:
            self.stem0 = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C // 2), nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(C))
            C_prev_prev, C_prev, C_curr = C, C, C
            reduction_prev = True
        else:
            C_curr = 3 * C
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
            C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
            reduction_prev = False
        self.cells = nn.ModuleList()
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_to_auxiliary = C_prev
        if auxiliary:
            self.auxiliary_head = AuxiliaryHead(C_to_auxiliary, num_classes, imagenet)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, input):
        logits_aux = None
        if self.imagenet:
            s0 = self.stem0(input)
            s1 = self.stem1(s0)
        else:
            s0 = s1 = self.stem(input)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.view(out.size(0), -1)), logits_aux


def parse_genotype(text):
    return eval(text, {"Genotype": Genotype, "range": range})


def count_final(args):
    g = parse_genotype(args.genotype)
    model = EvalNetwork(args.channels, args.classes, args.layers, True, g, imagenet=args.imagenet,
                        in_channels=args.in_channels)
    print(sum(p.numel() for name, p in model.named_parameters() if 'auxiliary' not in name))


def bench_final(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = EvalNetwork(args.channels, 10, args.layers, True, parse_genotype(args.genotype)).to(dev, memory_format=fmt)
    model.train()
    model.drop_path_prob = 0.2
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    amp = args.amp == "bf16"

    def step():
        opt.zero_grad()
        # Mixed precision as PyTorch users write it: forward and loss under autocast, backward outside.
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits, aux = model(x)
            loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()

    r = timeit(step, args.repeats)
    r["peak_rss_mb"] = peak_rss_mb()
    if dev.type == "cuda":
        r["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    r["aten_calls"] = count_aten(step)
    print(json.dumps({"impl": impl_name(args, amp), "name": "final_train_step", **r}), flush=True)


def count(args):
    model = Network(args.channels, args.classes, args.layers, in_channels=args.in_channels, k=args.partial,
                    aux_skip=args.aux_skip)
    print(sum(p.numel() for p in model.parameters()))


def check_supernet(args):
    """Loads a supernet written by darts' test (weights, BN statistics, alphas, betas, a batch, and darts'
    logits, loss and architecture gradients) into this reference and prints the largest differences."""
    t = read_safetensors(args.weights)
    model = Network(args.channels, args.classes, args.layers, steps=args.nodes, multiplier=args.nodes,
                    in_channels=args.in_channels, k=args.partial, edge_norm=args.edge_norm, aux_skip=args.aux_skip)
    state = {k: v for k, v in t.items() if "/" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.endswith("num_batches_tracked") for m in missing), missing
    arch = model.arch_parameters()
    names = ["alpha/normal", "alpha/reduce", "beta/normal", "beta/reduce"][:len(arch)]
    with torch.no_grad():
        for p, n in zip(arch, names):
            p.copy_(t[n])
    model.train()
    logits = model(t["test/x"])
    loss = F.cross_entropy(logits, t["test/y"].long())
    grads = torch.autograd.grad(loss, arch)
    out = {"logits": (logits - t["test/logits"]).abs().max().item(),
           "loss": abs(loss.item() - t["test/loss"].item()),
           "loss_value": loss.item()}
    for n, g in zip(names, grads):
        out["grad " + n] = (g - t["test/grad/" + n]).abs().max().item()
        out["grad scale " + n] = g.abs().max().item()
    print(json.dumps(out))


def check_architect(a):
    """Loads a supernet, its SGD momentum buffers, a training and a validation batch written by darts' test,
    runs this file's Architect (the original architect.py's unrolled step, with the momentum term) and prints
    the largest differences from darts' second-order hypergradient."""
    t = read_safetensors(a.weights)
    model = Network(a.channels, a.classes, a.layers, steps=a.nodes, multiplier=a.nodes, in_channels=a.in_channels)
    state = {k: v for k, v in t.items() if "/" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.endswith("num_batches_tracked") for m in missing), missing
    arch = model.arch_parameters()
    names = ["alpha/normal", "alpha/reduce"]
    with torch.no_grad():
        for p, n in zip(arch, names):
            p.copy_(t[n])
    model.train()
    w_opt = torch.optim.SGD(model.parameters(), a.eta, momentum=a.momentum, weight_decay=a.weight_decay)
    for name, p in model.named_parameters():
        w_opt.state[p]["momentum_buffer"] = t["sgd/" + name].clone()
    architect = Architect(model, momentum=a.momentum, wd=a.weight_decay)
    architect._backward_step_unrolled(t["test/xt"], t["test/yt"].long(), t["test/xv"], t["test/yv"].long(), a.eta,
                                      w_opt)
    out = {}
    for n, p in zip(names, arch):
        out["grad " + n] = (p.grad - t["test/h/" + n]).abs().max().item()
        out["grad scale " + n] = p.grad.abs().max().item()
    print(json.dumps(out))


def check_final_train(a):
    """The final network in training mode, as the original train.py runs it: drop path (its Bernoulli masks
    replaced by the ones darts drew, fed in the order the original's cells call drop_path), the auxiliary head
    and the loss `criterion(logits) + auxiliary_weight * criterion(logits_aux)` (label smoothing as
    train_imagenet.py's CrossEntropyLabelSmooth). Prints the largest differences from darts' logits, loss,
    weight gradients and BN statistics after the pass."""
    global drop_path
    t = read_safetensors(a.weights)
    model = EvalNetwork(a.channels, a.classes, a.layers, True, parse_genotype(a.genotype), in_channels=a.in_channels)
    state = {k: v for k, v in t.items() if "/" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m.endswith("num_batches_tracked") for m in missing), missing
    rows = iter(t["test/masks"])
    used = [0]

    def fed(x, drop_prob):
        if drop_prob > 0.:
            keep_prob = 1. - drop_prob
            used[0] += 1
            x = x.div(keep_prob) * next(rows).view(-1, 1, 1, 1)
        return x

    drop_path = fed
    model.train()
    model.drop_path_prob = a.drop_prob
    x, y = t["test/x"], t["test/y"].long()
    logits, logits_aux = model(x)
    if a.label_smoothing > 0:
        criterion = lambda l: (-((1 - a.label_smoothing) * F.one_hot(y, a.classes) + a.label_smoothing / a.classes)
                               * F.log_softmax(l, 1)).mean(0).sum()
    else:
        criterion = lambda l: F.cross_entropy(l, y)
    loss = criterion(logits) + a.aux_weight * criterion(logits_aux)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    grad_diff = max((g - t["test/grad/" + n]).abs().max().item() for n, g in zip(params, grads))
    grad_scale = max(g.abs().max().item() for g in grads)
    stats = {k: v for k, v in model.state_dict().items() if "running" in k}
    print(json.dumps({"logits": (logits - t["test/logits"]).abs().max().item(),
                      "aux": (logits_aux - t["test/aux"]).abs().max().item(),
                      "loss": abs(loss.item() - t["test/loss"].item()), "loss_value": loss.item(),
                      "grad": grad_diff, "grad scale": grad_scale, "masks used": used[0],
                      "masks given": int(t["test/masks"].shape[0]),
                      "stats": max((v - t["test/stats/" + k]).abs().max().item() for k, v in stats.items())}))


def peak_rss_mb():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve from the parent process.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1000.0)
    ts.sort()
    return {"min_ms": ts[0], "median_ms": ts[len(ts) // 2]}


def count_aten(fn):
    """Calls of aten:: operators in one run of fn, as torch.profiler lists them (nested calls included)."""
    from torch.autograd import profiler
    with profiler.profile() as prof:
        fn()
        sync()
    return sum(1 for e in prof.function_events if e.name.startswith("aten::"))


def impl_name(args, amp=False):
    name = "pytorch channels-last" if args.channels_last else "pytorch"
    return name + " (bf16)" if amp else name


def bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = Network(args.channels, 10, args.layers, in_channels=3).to(dev, memory_format=fmt)
    model.alphas_normal = model.alphas_normal.detach().to(dev).requires_grad_(True)
    model.alphas_reduce = model.alphas_reduce.detach().to(dev).requires_grad_(True)
    model.train()
    w_opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    arch = Architect(model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    xv = torch.randn(args.batch, 3, args.size, args.size, device=dev).contiguous(memory_format=fmt)
    yv = torch.randint(0, 10, (args.batch,), device=dev)

    def forward():
        with torch.no_grad():
            model(x)

    def weight_step():
        w_opt.zero_grad()
        model._loss(x, y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        w_opt.step()

    def first_order():
        arch.step(x, y, xv, yv, 0.025, w_opt, unrolled=False)
        weight_step()

    def second_order():
        arch.step(x, y, xv, yv, 0.025, w_opt, unrolled=True)
        weight_step()

    rows = {}
    for name, fn in [("forward", forward), ("forward_backward_sgd", weight_step),
                     ("first_order_step", first_order), ("second_order_step", second_order)]:
        if name in args.only.split(","):
            r = timeit(fn, args.repeats)
            r["peak_rss_mb"] = peak_rss_mb()
            if dev.type == "cuda":
                r["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
            r["aten_calls"] = count_aten(fn)
            rows[name] = r
            print(json.dumps({"impl": impl_name(args), "name": name, **r}), flush=True)


def read_safetensors(path):
    """A safetensors file as a state_dict (the format is an 8-byte header size, a JSON header, raw data)."""
    import struct
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    kinds = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        start, end = v["data_offsets"]
        raw = bytearray(data[8 + n + start:8 + n + end])
        out[key] = torch.frombuffer(raw, dtype=kinds[v["dtype"]]).reshape(v["shape"]) if raw else \
            torch.zeros(v["shape"], dtype=kinds[v["dtype"]])
    return out


def read_idx(path):
    import gzip
    import struct
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def check_weights(a):
    """Loads darts' model-*.safetensors into the original NetworkCIFAR with load_state_dict(strict=True) and
    evaluates it on the first --limit images of an IDX test set; prints loss and top-1 as JSON."""
    model = EvalNetwork(a.channels, a.classes, a.layers, a.auxiliary, parse_genotype(a.genotype),
                        in_channels=a.in_channels)
    model.load_state_dict(read_safetensors(a.weights), strict=True)
    model.eval()
    x = read_idx(a.images)[:a.limit].float().div(255.0).unsqueeze(1)
    y = read_idx(a.labels)[:a.limit].long()
    x = (x - a.mean) / a.std
    with torch.no_grad():
        logits, _ = model(x)
    print(json.dumps({"loss": F.cross_entropy(logits, y).item(),
                      "top1": (logits.argmax(1) == y).float().mean().item(), "examples": len(y)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["count", "bench", "count-final", "bench-final", "check-weights",
                                    "check-supernet", "check-architect", "check-final-train"])
    ap.add_argument("--genotype", default="")
    ap.add_argument("--imagenet", action="store_true")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--channels-last", action="store_true", help="bench: model and input in channels_last")
    ap.add_argument("--only", default="forward,forward_backward_sgd,first_order_step,second_order_step")
    ap.add_argument("--auxiliary", action="store_true")
    ap.add_argument("--partial", type=int, default=1)
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--edge-norm", action="store_true")
    ap.add_argument("--aux-skip", type=float, default=None, help="DARTS-' auxiliary skip connection, this weight")
    ap.add_argument("--weights", default="")
    ap.add_argument("--images", default="")
    ap.add_argument("--labels", default="")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--mean", type=float, default=0.2860)
    ap.add_argument("--std", type=float, default=0.3530)
    ap.add_argument("--drop-prob", type=float, default=0.0, help="check-final-train: drop path probability")
    ap.add_argument("--aux-weight", type=float, default=0.4)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--eta", type=float, default=0.025, help="check-architect: the weights' learning rate")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=3e-4)
    a = ap.parse_args()
    {"count": count, "bench": bench, "count-final": count_final, "bench-final": bench_final,
     "check-weights": check_weights, "check-supernet": check_supernet, "check-architect": check_architect,
     "check-final-train": check_final_train}[a.cmd](a)
