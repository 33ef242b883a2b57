// Every difference between the Nix versions nix-winvm builds against lives here.
//
// build.rs passes NIX_MAJOR/NIX_MINOR/NIX_PATCH from `pkg-config --modversion nix-expr`, or,
// for Lix (pkg-config module lix-expr), NIXC_LIX=1; Lix's own lix/config.h then gives
// LIX_MAJOR/LIX_MINOR/LIX_PATCH. Load-tested: Nix 2.8.0 (Debian 12), 2.26.3 and 2.34.8
// (scripts/with-nix). Compiled, with the unit tests run (scripts/compile-check): 2.24.15,
// 2.28.7, 2.31.5, 2.35.2 and Lix 2.95.3. Anything between Nix 2.9 and 2.23, and Lix before
// 2.95, is refused.
//
// Lix's version numbers (2.9x) would trip the Nix gates, so every function tests NIXC_LIX
// first and NIXC_GE is false under Lix. Lix 2.95's shape (read from lix/libexpr/*.hh at
// 2.95.3): primops take no position (`void(EvalState &, Value **, Value &)`), are registered
// with PluginPrimOps::add; values are built by value (`Value{NewValueAs::string, s}`);
// `Attr::value` is a Value; the symbol table, memory, builtins and error builder are in
// `state.ctx`; `callFunction` returns its result; the store's queries are promises that
// `state.aio.blockOn` waits for.
#pragma once

#if defined(NIXC_LIX) && NIXC_LIX
#undef NIXC_LIX
#define NIXC_LIX 1
#include <lix/config.h>
#if !defined(LIX_MAJOR) || LIX_MAJOR != 2 || LIX_MINOR < 95
#error "nix-winvm supports Lix >= 2.95 (PluginPrimOps); this Lix is older"
#endif
// No Nix version gate applies to Lix.
#define NIXC_GE(m, p) 0
#include <lix/libexpr/eval.hh>
#include <lix/libexpr/eval-inline.hh>
#include <lix/libexpr/eval-settings.hh>
#include <lix/libexpr/primops.hh>
#include <lix/libexpr/attr-set.hh>
#include <lix/libstore/globals.hh>
#include <lix/libstore/store-api.hh>
#include <lix/libutil/config.hh>
#else
#undef NIXC_LIX
#define NIXC_LIX 0

#if !defined(NIX_MAJOR) || !defined(NIX_MINOR) || !defined(NIX_PATCH)
#error "build.rs must define NIX_MAJOR, NIX_MINOR and NIX_PATCH (or NIXC_LIX)"
#endif

#define NIXC_GE(m, p) (NIX_MAJOR > 2 || (NIX_MAJOR == 2 && (NIX_MINOR > (m) || (NIX_MINOR == (m) && NIX_PATCH >= (p)))))

#if NIXC_GE(9, 0) && !NIXC_GE(24, 0)
#error "nix-winvm supports Nix 2.8 and Nix >= 2.24; this Nix is in between"
#endif

#if __has_include(<nix/expr/eval.hh>)
#include <nix/expr/eval.hh>
#include <nix/expr/eval-inline.hh>
#include <nix/expr/eval-settings.hh>
#include <nix/expr/primops.hh>
#include <nix/expr/attr-set.hh>
#include <nix/store/globals.hh>
#include <nix/store/store-api.hh>
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
#if __has_include("eval-settings.hh")
#include "eval-settings.hh" // 2.8 declares evalSettings in eval.hh
#endif
#include "primops.hh"
#include "attr-set.hh"
#include "globals.hh"
#include "store-api.hh"
#endif
#endif

#include <string>
#include <string_view>
#include <vector>

namespace nixc {

#if NIXC_LIX || NIXC_GE(24, 0)
using Pos = nix::PosIdx;
#define NIXC_ECTX(s) , s
#else
using Pos = const nix::Pos &;
#define NIXC_ECTX(s)
#endif

// The primop signature, written once: NIXC_PRIMOP(name) { ... uses state, pos, args, v ... }.
// `name` is the function to register; under Lix, whose primops get no position, it binds
// `pos` to noPos and calls the body.
#if NIXC_LIX
using PrimOpFn = void (*)(nix::EvalState &, nix::Value **, nix::Value &);
#define NIXC_PRIMOP(fn)                                                                              \
    static void fn##_body(nix::EvalState & state, nixc::Pos pos, nix::Value ** args, nix::Value & v); \
    static void fn(nix::EvalState & state, nix::Value ** args, nix::Value & v)                       \
    {                                                                                                \
        fn##_body(state, nix::noPos, args, v);                                                       \
    }                                                                                                \
    static void fn##_body(nix::EvalState & state, nixc::Pos pos, nix::Value ** args, nix::Value & v)
#else
using PrimOpFn = void (*)(nix::EvalState &, Pos, nix::Value **, nix::Value &);
#define NIXC_PRIMOP(fn) static void fn(nix::EvalState & state, nixc::Pos pos, nix::Value ** args, nix::Value & v)
#endif

inline std::string nix_version() { return nix::nixVersion; }

inline void force(nix::EvalState & state, nix::Value & val, Pos pos) { state.forceValue(val, pos); }

inline void force_attrs(nix::EvalState & state, nix::Value & val, Pos pos)
{
    state.forceAttrs(val, pos NIXC_ECTX("while evaluating a nix-winvm argument"));
}

// 2.8's Bindings has no const iteration; Nix >= 2.24 hands out only const Bindings; Lix's
// iterates only non-const.
#if NIXC_LIX
inline nix::Bindings * attrs_of(const nix::Value & val) { return val.attrs(); }
#elif NIXC_GE(24, 0)
inline const nix::Bindings * attrs_of(const nix::Value & val) { return val.attrs(); }
#else
inline nix::Bindings * attrs_of(const nix::Value & val) { return val.attrs; }
#endif

// The value of an attribute met while iterating attrs_of(): a pointer in Nix, a Value in Lix.
inline nix::Value * attr_value(const nix::Attr & attr)
{
#if NIXC_LIX
    return &attr.value; // mutable
#else
    return attr.value;
#endif
}

inline nix::SymbolTable & symbols(nix::EvalState & state)
{
#if NIXC_LIX
    return state.ctx.symbols;
#else
    return state.symbols;
#endif
}

inline std::string_view symbol_text(nix::EvalState & state, const nix::Symbol & s)
{
#if NIXC_LIX || NIXC_GE(24, 0)
    return symbols(state)[s];
#else
    (void) state;
    return std::string_view(s);
#endif
}

inline nix::Value * find_attr(nix::EvalState & state, const nix::Value & set, std::string_view name)
{
    auto * a = attrs_of(set)->get(symbols(state).create(name));
    return a ? attr_value(*a) : nullptr;
}

inline std::string_view string_text(const nix::Value & val)
{
#if NIXC_LIX
    return val.str();
#elif NIXC_GE(24, 0)
    return val.string_view();
#else
    return val.string.s;
#endif
}

inline bool string_has_context(const nix::Value & val)
{
#if NIXC_LIX
    return val.string().context && *val.string().context;
#elif NIXC_GE(24, 0)
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
#if NIXC_LIX || NIXC_GE(24, 0)
    return val.path().to_string();
#else
    return val.path;
#endif
}

inline int64_t int_of(const nix::Value & val)
{
#if NIXC_LIX || NIXC_GE(25, 0)
    return int64_t(val.integer().value); // checked::Checked<int64_t>
#elif NIXC_GE(24, 0)
    return val.integer();
#else
    return val.integer;
#endif
}

inline bool bool_of(const nix::Value & val)
{
#if NIXC_LIX || NIXC_GE(24, 0)
    return val.boolean();
#else
    return val.boolean;
#endif
}

inline double float_of(const nix::Value & val)
{
#if NIXC_LIX || NIXC_GE(24, 0)
    return val.fpoint();
#else
    return val.fpoint;
#endif
}

inline std::vector<nix::Value *> list_items(const nix::Value & val)
{
    std::vector<nix::Value *> out;
#if NIXC_LIX
    // Lix's list holds the Values themselves; the iterator is a pointer to each.
    for (auto it = val.listItems().begin(); it != val.listItems().end(); ++it) out.push_back(it);
#elif NIXC_GE(30, 0)
    for (auto * e : val.listView()) out.push_back(e);
#else
    for (auto * e : const_cast<nix::Value &>(val).listItems()) out.push_back(e);
#endif
    return out;
}

// A Value on the GC heap, for what Nix keeps a pointer to (bindings, call arguments, stages).
inline nix::Value * alloc_value(nix::EvalState & state)
{
#if NIXC_LIX
    return new (state.ctx.mem.allocType<nix::Value>()) nix::Value(nix::NewValueAs::null);
#else
    return state.allocValue();
#endif
}

inline void mk_int(nix::Value & val, int64_t i)
{
#if NIXC_LIX
    val = nix::Value(nix::NewValueAs::integer, nix::NixInt(i));
#else
    val.mkInt(i);
#endif
}

inline void mk_bool(nix::Value & val, bool b)
{
#if NIXC_LIX
    val = nix::Value(nix::NewValueAs::boolean, b);
#else
    val.mkBool(b);
#endif
}

inline void mk_string(nix::EvalState & state, nix::Value & val, std::string_view s)
{
#if NIXC_LIX
    (void) state;
    val = nix::Value(nix::NewValueAs::string, s);
#elif NIXC_GE(33, 0)
    val.mkString(s, state.mem);
#else
    (void) state;
    val.mkString(s);
#endif
}

inline void mk_path(nix::EvalState & state, nix::Value & val, const std::string & p)
{
#if NIXC_LIX
    (void) state;
    val = nix::Value(nix::NewValueAs::path, nix::SourcePath(nix::CanonPath(p)));
#elif NIXC_GE(33, 0)
    val.mkPath(state.rootPath(nix::CanonPath(p)), state.mem);
#elif NIXC_GE(24, 0)
    val.mkPath(state.rootPath(nix::CanonPath(p)));
#else
    (void) state;
    val.mkPath(p);
#endif
}

// Attribute sets: build_bindings(state, n), then bind(...) each attribute (or insert an
// existing Attr with `.insert(attr)`), then mk_attrs(v, bindings).
inline nix::BindingsBuilder build_bindings(nix::EvalState & state, size_t capacity)
{
#if NIXC_LIX
    return state.ctx.buildBindings(capacity);
#else
    return state.buildBindings(capacity);
#endif
}

inline void bind(nix::EvalState & state, nix::BindingsBuilder & bindings, std::string_view name, nix::Value * val)
{
#if NIXC_LIX
    bindings.insert(symbols(state).create(name), *val);
#else
    bindings.insert(symbols(state).create(name), val);
#endif
}

inline void mk_attrs(nix::Value & val, nix::BindingsBuilder & bindings)
{
#if NIXC_LIX
    val = nix::Value(nix::NewValueAs::attrs, bindings);
#else
    val.mkAttrs(bindings);
#endif
}

// `result` = builtins.<name> applied to `arg` (lazily, as Nix's own call does).
inline void call_builtin(nix::EvalState & state, const char * name, nix::Value & arg, nix::Value & result, Pos pos)
{
#if NIXC_LIX
    result = state.callFunction(state.ctx.builtins.get(name), arg, pos);
#else
    state.callFunction(state.getBuiltin(name), arg, result, pos);
#endif
}

// A host path (a file or folder) for `derivation` to copy into the store, as a path literal
// would be. Lix tells a path value from a string by the address of the header's inline
// Value::String::path array, of which the plugin's link keeps a copy of its own: a path value
// made here would read as a string. So under Lix builtins.path copies it (the same
// content-addressed store path) and the result is a string with that context.
inline void host_path(nix::EvalState & state, nix::Value & val, const std::string & p, Pos pos)
{
#if NIXC_LIX
    nix::Value * path = alloc_value(state);
    mk_string(state, *path, p);
    auto bindings = build_bindings(state, 1);
    bind(state, bindings, "path", path);
    nix::Value * arg = alloc_value(state);
    mk_attrs(*arg, bindings);
    call_builtin(state, "path", *arg, val, pos);
#else
    (void) pos;
    mk_path(state, val, p);
#endif
}

// Evaluation in pure mode (flakes by default): no host path may be read, so the shim never copies one.
inline bool pure_eval(nix::EvalState & state)
{
#if NIXC_LIX
    (void) state;
    return nix::evalSettings.pureEval;
#elif NIXC_GE(24, 0)
    return state.settings.pureEval;
#else
    (void) state;
    return nix::evalSettings.pureEval;
#endif
}

// Whether `root` (a store path, no subpath) is valid in the store the evaluation writes to.
inline bool store_path_valid(nix::EvalState & state, const std::string & root)
{
#if NIXC_LIX
    return state.aio.blockOn(state.ctx.store->isValidPath(state.ctx.store->parseStorePath(root)));
#else
    return state.store->isValidPath(state.store->parseStorePath(root));
#endif
}

// `text` (`root` or a path inside it) as a string whose context names the store path `root`, as
// `"${storePath}"` would give, without `builtins.storePath`, which pure evaluation refuses.
inline void mk_store_string(nix::EvalState & state, nix::Value & val, std::string_view text, const std::string & root)
{
#if NIXC_LIX
    auto path = state.ctx.store->parseStorePath(root);
    // As Lix's own mkStorePathString does: a restricted evaluation may read what it names.
    state.ctx.paths.allowPath(path);
    val = nix::Value(nix::NewValueAs::string, text, nix::NixStringContext{nix::NixStringContextElem::Opaque{.path = path}});
#elif NIXC_GE(24, 0)
    nix::NixStringContext context{nix::NixStringContextElem::Opaque{.path = state.store->parseStorePath(root)}};
#if NIXC_GE(33, 0)
    val.mkString(text, context, state.mem);
#else
    val.mkString(text, context);
#endif
#else
    (void) state;
    val.mkString(text, nix::PathSet{root});
#endif
}

inline void mk_string_list(nix::EvalState & state, nix::Value & val, const std::vector<std::string> & items)
{
#if NIXC_LIX
    auto * list = state.ctx.mem.newList(items.size());
    for (size_t i = 0; i < items.size(); i++) list->elems[i] = nix::Value(nix::NewValueAs::string, items[i]);
    val = nix::Value(nix::NewValueAs::list, list);
#elif NIXC_GE(24, 0)
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
#if NIXC_LIX
    state.ctx.errors.make<nix::EvalError>("%s", msg).atPos(pos).debugThrow();
#elif NIXC_GE(24, 0)
    state.error<nix::EvalError>("%s", msg).atPos(pos).debugThrow();
#else
    (void) state;
    throw nix::EvalError({.msg = nix::hintfmt("%s", msg), .errPos = pos});
#endif
}

inline void register_primop(const char * name, size_t arity, const char * doc,
    std::vector<std::string> arg_names, PrimOpFn fn)
{
#if NIXC_LIX
    // Read by every EvalState made after the plugin is loaded (createBaseEnv).
    nix::PluginPrimOps::add(nix::PrimOpDetails{.name = name, .args = arg_names, .arity = arity, .doc = doc, .fun = fn});
#elif NIXC_GE(34, 0)
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
