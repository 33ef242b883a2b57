// Every difference between the Nix versions nix-winvm builds against lives here.
//
// build.rs passes NIX_MAJOR/NIX_MINOR/NIX_PATCH from `pkg-config --modversion nix-expr`.
// Built and tested: Nix 2.8.0 (Debian 12), 2.26.3 and 2.34.8 (scripts/with-nix). The gates
// between them follow those versions' headers as read, not compiled; anything between 2.9
// and 2.23 is refused. README, "Nix versions", says which versions are believed to work.
#pragma once

#if !defined(NIX_MAJOR) || !defined(NIX_MINOR) || !defined(NIX_PATCH)
#error "build.rs must define NIX_MAJOR, NIX_MINOR and NIX_PATCH"
#endif

#define NIXC_GE(m, p) (NIX_MAJOR > 2 || (NIX_MAJOR == 2 && (NIX_MINOR > (m) || (NIX_MINOR == (m) && NIX_PATCH >= (p)))))

#if NIXC_GE(9, 0) && !NIXC_GE(24, 0)
#error "nix-winvm supports Nix 2.8 and Nix >= 2.24; this Nix is in between"
#endif

#if __has_include(<nix/expr/eval.hh>)
#include <nix/expr/eval.hh>
#include <nix/expr/eval-inline.hh>
#include <nix/expr/primops.hh>
#include <nix/expr/attr-set.hh>
#include <nix/store/globals.hh>
#include <nix/util/configuration.hh>
#else
#if __has_include("config-expr.hh")
#include "config-util.hh"
#include "config-store.hh"
#include "config-expr.hh"
#else
#include "config.h"
#endif
#include "eval.hh"
#include "eval-inline.hh"
#include "primops.hh"
#include "attr-set.hh"
#include "globals.hh"
#endif

#include <string>
#include <string_view>
#include <vector>

namespace nixc {

#if NIXC_GE(24, 0)
using Pos = nix::PosIdx;
#define NIXC_ECTX(s) , s
#else
using Pos = const nix::Pos &;
#define NIXC_ECTX(s)
#endif

// The primop signature, written once: NIXC_PRIMOP(name) { ... uses state, pos, args, v ... }
#define NIXC_PRIMOP(fn) static void fn(nix::EvalState & state, nixc::Pos pos, nix::Value ** args, nix::Value & v)

inline std::string nix_version() { return nix::nixVersion; }

inline void force(nix::EvalState & state, nix::Value & val, Pos pos) { state.forceValue(val, pos); }

inline void force_attrs(nix::EvalState & state, nix::Value & val, Pos pos)
{
    state.forceAttrs(val, pos NIXC_ECTX("while evaluating a nix-winvm argument"));
}

// 2.8's Bindings has no const iteration; later versions hand out only const Bindings.
#if NIXC_GE(24, 0)
inline const nix::Bindings * attrs_of(const nix::Value & val) { return val.attrs(); }
#else
inline nix::Bindings * attrs_of(const nix::Value & val) { return val.attrs; }
#endif

inline std::string_view symbol_text(nix::EvalState & state, const nix::Symbol & s)
{
#if NIXC_GE(24, 0)
    return state.symbols[s];
#else
    (void) state;
    return std::string_view(s);
#endif
}

inline nix::Value * find_attr(nix::EvalState & state, const nix::Value & set, std::string_view name)
{
    auto * a = attrs_of(set)->get(state.symbols.create(name));
    return a ? a->value : nullptr;
}

inline std::string_view string_text(const nix::Value & val)
{
#if NIXC_GE(24, 0)
    return val.string_view();
#else
    return val.string.s;
#endif
}

inline bool string_has_context(const nix::Value & val)
{
#if NIXC_GE(24, 0)
    // A null-terminated `const char **` until 2.32, a sized `Context` array after.
    return [](auto * ctx) {
        if constexpr (requires { ctx->size(); })
            return ctx && ctx->size() > 0;
        else
            return ctx && *ctx;
    }(val.context());
#else
    return val.string.context && *val.string.context;
#endif
}

inline std::string path_text(const nix::Value & val)
{
#if NIXC_GE(24, 0)
    return val.path().to_string();
#else
    return val.path;
#endif
}

inline int64_t int_of(const nix::Value & val)
{
#if NIXC_GE(24, 0)
    return int64_t(val.integer().value);
#else
    return val.integer;
#endif
}

inline bool bool_of(const nix::Value & val)
{
#if NIXC_GE(24, 0)
    return val.boolean();
#else
    return val.boolean;
#endif
}

inline double float_of(const nix::Value & val)
{
#if NIXC_GE(24, 0)
    return val.fpoint();
#else
    return val.fpoint;
#endif
}

inline std::vector<nix::Value *> list_items(const nix::Value & val)
{
    std::vector<nix::Value *> out;
#if NIXC_GE(30, 0)
    for (auto * e : val.listView()) out.push_back(e);
#else
    for (auto * e : const_cast<nix::Value &>(val).listItems()) out.push_back(e);
#endif
    return out;
}

inline void mk_string(nix::EvalState & state, nix::Value & val, std::string_view s)
{
#if NIXC_GE(33, 0)
    val.mkString(s, state.mem);
#else
    (void) state;
    val.mkString(s);
#endif
}

inline void mk_path(nix::EvalState & state, nix::Value & val, const std::string & p)
{
#if NIXC_GE(33, 0)
    val.mkPath(state.rootPath(nix::CanonPath(p)), state.mem);
#elif NIXC_GE(24, 0)
    val.mkPath(state.rootPath(nix::CanonPath(p)));
#else
    (void) state;
    val.mkPath(p);
#endif
}

inline void mk_string_list(nix::EvalState & state, nix::Value & val, const std::vector<std::string> & items)
{
#if NIXC_GE(24, 0)
    auto list = state.buildList(items.size());
    for (size_t i = 0; i < items.size(); i++) {
        list[i] = state.allocValue();
        mk_string(state, *list[i], items[i]);
    }
    val.mkList(list);
#else
    state.mkList(val, items.size());
    for (size_t i = 0; i < items.size(); i++) {
        auto * e = state.allocValue();
        mk_string(state, *e, items[i]);
        val.listElems()[i] = e;
    }
#endif
}

[[noreturn]] inline void throw_eval_error(nix::EvalState & state, Pos pos, const std::string & msg)
{
#if NIXC_GE(24, 0)
    state.error<nix::EvalError>("%s", msg).atPos(pos).debugThrow();
#else
    (void) state;
    throw nix::EvalError({.msg = nix::hintfmt("%s", msg), .errPos = pos});
#endif
}

inline void register_primop(const char * name, size_t arity, const char * doc,
    std::vector<std::string> arg_names,
    void (*fn)(nix::EvalState &, Pos, nix::Value **, nix::Value &))
{
#if NIXC_GE(34, 0)
    static std::vector<nix::RegisterPrimOp> keep;
    keep.emplace_back(nix::PrimOp{.name = name, .args = arg_names, .arity = arity, .doc = doc, .impl = fn});
#elif NIXC_GE(24, 0)
    static std::vector<nix::RegisterPrimOp> keep;
    keep.emplace_back(nix::PrimOp{.name = name, .args = arg_names, .arity = arity, .doc = doc, .fun = fn});
#else
    // RegisterPrimOp's constructor only appends to a global list; the object itself is inert.
    nix::RegisterPrimOp(nix::RegisterPrimOp::Info{
        .name = name, .args = arg_names, .arity = arity, .doc = doc, .fun = fn});
#endif
}

} // namespace nixc
